// run-ledger web view: live updates and actions. Hand-written, no build step, same origin only.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var seqShown = document.getElementById("seq");
  var status = document.getElementById("live-status");
  var flash = document.getElementById("flash");
  var wanted = Number(document.body.dataset.seq || 0);
  var shown = wanted;
  var busy = false;
  var MIN_GAP_MS = 250;  // at most one refresh this often
  var lastRefresh = 0;

  function refresh() {
    if (busy || wanted <= shown) return;
    var wait = lastRefresh + MIN_GAP_MS - Date.now();
    if (wait > 0) { setTimeout(refresh, wait); return; }
    busy = true;
    lastRefresh = Date.now();
    var target = wanted;
    fetch(location.href, { headers: { "Accept": "text/html" }, credentials: "same-origin", cache: "no-store" })
      .then(function (resp) { return resp.ok ? resp.text() : Promise.reject(resp.status); })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("live");
        if (fresh && live) live.innerHTML = fresh.innerHTML;
        // What the fetched page shows, not what was wanted: views behind the target (an action's event
        // not applied yet) are fetched again, else a page could stay on the state before the action.
        shown = Math.max(shown, Number(doc.body.dataset.seq || target));
        if (seqShown) seqShown.textContent = String(shown);
      })
      .catch(function () { shown = target; })
      .then(function () { busy = false; if (wanted > shown) refresh(); });
  }

  if (window.EventSource && live) {
    var source = new EventSource("/web/events");
    source.onopen = function () { document.body.dataset.live = "on"; };
    source.addEventListener("seq", function (e) {
      if (status) status.classList.remove("off");
      var seq = Number(e.data);
      if (seq > wanted) { wanted = seq; refresh(); }
    });
    source.onerror = function () { document.body.dataset.live = "off"; if (status) status.classList.add("off"); };
    window.addEventListener("pagehide", function () { source.close(); });
  }

  function show(message, refused) {
    if (!flash) return;
    flash.textContent = message;
    flash.className = refused ? "refused" : "";
  }

  document.addEventListener("submit", function (e) {
    var form = e.target;
    if (!form.classList || !form.classList.contains("action")) return;
    e.preventDefault();
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
    var button = form.querySelector("button");
    if (button) button.disabled = true;
    fetch(form.action, { method: "POST", credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (resp) {
        return resp.json().then(function (body) { return { ok: resp.ok, body: body }; });
      })
      .then(function (r) {
        show(r.ok ? r.body.message : r.body.error, !r.ok);
        if (r.ok && r.body.appended) { wanted = Math.max(wanted, shown + 1); refresh(); }
      })
      .catch(function (err) { show("request failed: " + err, true); })
      .then(function () { if (button) button.disabled = false; });
  });
})();
