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
import {Decoration, MatchDecorator, ViewPlugin, keymap} from "@codemirror/view"
import {HighlightStyle, syntaxHighlighting} from "@codemirror/language"
import {tags as t} from "@lezer/highlight"
import {indentWithTab} from "@codemirror/commands"
import {jinja, closePercentBrace} from "@codemirror/lang-jinja"
import {yamlFrontmatter} from "@codemirror/lang-yaml"

const VARIABLE_INFO = {
  input: "the example's input",
  labels: "the allowed labels (output type label)",
  schema: "the output's JSON schema, as text (output type json)",
  demos: "the few-shot demos: a list of {input, output, ...}",
}

// Jinja and front matter colours (the default style leaves braces and variable names plain).
const promptStyle = HighlightStyle.define([
  {tag: t.brace, color: "#b45309", fontWeight: "600"},
  {tag: [t.variableName, t.standard(t.variableName)], color: "#7c3aed"},
  {tag: t.special(t.variableName), color: "#0e7490"},
  {tag: [t.keyword, t.controlKeyword, t.definitionKeyword, t.operatorKeyword], color: "#1d4ed8", fontWeight: "600"},
  {tag: [t.propertyName, t.definition(t.propertyName)], color: "#0f766e"},
  {tag: t.string, color: "#15803d"},
  {tag: [t.number, t.bool], color: "#c2410c"},
  {tag: [t.comment, t.blockComment, t.lineComment], color: "#6b7280", fontStyle: "italic"},
  {tag: [t.meta, t.processingInstruction], color: "#6b7280"},
])

// The role lines that split a prompt into messages: system:, user:, assistant:
const roleLines = ViewPlugin.fromClass(class {
  constructor(view) { this.decorations = roleMatcher.createDeco(view) }
  update(update) { this.decorations = roleMatcher.updateDeco(update, this.decorations) }
}, {decorations: v => v.decorations})
const roleMatcher = new MatchDecorator({
  regexp: /^(system|user|assistant):[ \t]*$/gm,
  decoration: () => Decoration.mark({class: "cm-tl-role"}),
})

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
        syntaxHighlighting(promptStyle),
        roleLines,
        EditorView.baseTheme({".cm-tl-role": {color: "#9333ea", fontWeight: "700", letterSpacing: ".02em"}}),
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
