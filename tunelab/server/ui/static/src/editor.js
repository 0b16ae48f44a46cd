// The prompt editor of tunelab's console: CodeMirror 6 with YAML front matter + Jinja highlighting
// and completion of the template's variables. Built into ../editor.min.js by `npm run build` here
// (see package.json); the built file is committed, so the server needs no Node and no CDN.
//
// Every <textarea data-editor> becomes an editor; the textarea stays in the form (hidden) and is
// kept in sync, with an `input` event on each change so HTMX triggers (live preview) still fire.
// `readonly` on the textarea makes a read-only view; `data-variables` (a JSON list of names) adds
// completions for the variables an example provides.
import {EditorView, basicSetup} from "codemirror"
import {EditorState} from "@codemirror/state"
import {keymap} from "@codemirror/view"
import {indentWithTab} from "@codemirror/commands"
import {jinja, closePercentBrace} from "@codemirror/lang-jinja"
import {yamlFrontmatter} from "@codemirror/lang-yaml"

const VARIABLE_INFO = {
  input: "the example's input",
  labels: "the allowed labels (output type label)",
  schema: "the output's JSON schema, as text (output type json)",
  demos: "the few-shot demos: a list of {input, output, ...}",
}

function variables(textarea) {
  let names = []
  try { names = JSON.parse(textarea.dataset.variables || "[]") } catch (e) { names = [] }
  const all = [...new Set([...Object.keys(VARIABLE_INFO), ...names])]
  return all.map(name => ({label: name, type: "variable", info: VARIABLE_INFO[name] || "a field of the example"}))
}

function attach(textarea) {
  const readOnly = textarea.hasAttribute("readonly")
  const sync = EditorView.updateListener.of(update => {
    if (!update.docChanged) return
    textarea.value = update.state.doc.toString()
    textarea.dispatchEvent(new Event("input", {bubbles: true}))
  })
  const view = new EditorView({
    state: EditorState.create({
      doc: textarea.value,
      extensions: [
        basicSetup,
        keymap.of([indentWithTab]),
        yamlFrontmatter({content: jinja({variables: variables(textarea)})}),
        closePercentBrace,
        EditorState.readOnly.of(readOnly),
        EditorView.editable.of(!readOnly),
        EditorView.lineWrapping,
        EditorView.contentAttributes.of({"aria-label": textarea.getAttribute("aria-label") || "prompt editor"}),
        sync,
      ],
    }),
  })
  textarea.style.display = "none"
  textarea.after(view.dom)
  view.dom.classList.add("tl-editor")
  view.dom.id = (textarea.id || "editor") + "-cm"
  textarea.editorView = view
  return view
}

function setText(textarea, text) {
  const view = textarea.editorView
  if (!view) { textarea.value = text; textarea.dispatchEvent(new Event("input", {bubbles: true})); return }
  view.dispatch({changes: {from: 0, to: view.state.doc.length, insert: text}})
}

window.tunelabEditor = {attach, setText}
document.querySelectorAll("textarea[data-editor]").forEach(attach)
