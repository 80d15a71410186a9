// llm-proxy admin: copy buttons. Loaded as a file (the CSP forbids inline script).
"use strict";

function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    return navigator.clipboard.writeText(text);
  }
  // Plain-HTTP pages have no async clipboard API: fall back to a hidden textarea.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.appendChild(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  return copied ? Promise.resolve() : Promise.reject(new Error("copy refused"));
}

function announce(message) {
  const status = document.querySelector(".copy-status");
  if (status) {
    status.textContent = message;
  }
}

function sourceText(element) {
  return element.tagName === "INPUT" || element.tagName === "TEXTAREA"
    ? element.value
    : element.textContent;
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) {
    return;
  }
  const source = document.getElementById(button.dataset.copy);
  if (!source) {
    return;
  }
  copyText(sourceText(source)).then(
    () => {
      button.textContent = "Copied";
      announce("Copied to the clipboard.");
      window.setTimeout(() => { button.textContent = "Copy"; }, 2000);
    },
    () => {
      if (source.select) {
        source.select();
      }
      announce("Copying was blocked: the text is selected, press Ctrl+C / ⌘C.");
    },
  );
});
