/* Swagger UI for /api/docs: loaded from this origin (no inline script, so the page's CSP keeps
   script-src 'self'). The spec URL comes from the page, the library from swagger-ui-dist. */
"use strict";

window.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    domNode: root,
    deepLinking: true,
    validatorUrl: null,       // never send the spec to an outside validator
    tryItOutEnabled: false,
    displayRequestDuration: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
