// tunelab console: small behaviours (scripts come only from /static: the CSP allows no inline script).
// A page restored from the back/forward cache is reloaded, so Back after a commit or a deploy never
// shows a stale history.
window.addEventListener("pageshow", function (event) { if (event.persisted) window.location.reload() })
// <select data-submit> submits its form when changed (the diff's version pickers, log filters).
document.addEventListener("change", function (event) {
  var el = event.target
  if (el.matches && el.matches("select[data-submit]") && el.form) el.form.submit()
})
// <button data-confirm="..."> asks first.
document.addEventListener("click", function (event) {
  var el = event.target.closest && event.target.closest("[data-confirm]")
  if (el && !window.confirm(el.getAttribute("data-confirm"))) event.preventDefault()
})
