// The console's only script (no inline script anywhere: the Content-Security-Policy forbids it).
// The overview's #live part is fetched again every 2 s from the URL in its data-live attribute;
// the server renders and escapes it, this only puts it in place. Nothing else changes the page.
(function () {
  "use strict";
  var EVERY_MS = 2000;

  function start() {
    var live = document.getElementById("live");
    if (!live) {
      return;
    }
    var url = live.getAttribute("data-live");
    var busy = false;

    function refresh() {
      if (busy || document.hidden) {
        return;  // one request at a time; none while the tab is hidden
      }
      busy = true;
      fetch(url, {credentials: "same-origin", cache: "no-store", headers: {"Accept": "text/html"}})
        .then(function (response) {
          // A logged-out session or a stopped console: keep what is shown.
          return response.ok ? response.text() : null;
        })
        .then(function (html) {
          if (html !== null) {
            live.innerHTML = html;
          }
        })
        .catch(function () {})
        .then(function () {
          busy = false;
        });
    }

    window.setInterval(refresh, EVERY_MS);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
