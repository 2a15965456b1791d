// P3S for ComfyUI: frontend extension (loaded by the ComfyUI frontend from WEB_DIRECTORY).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "p3s.core",
  async setup() {
    // A marker the browser tests read to prove this script was served and ran.
    window.__p3s = Object.assign(window.__p3s || {}, { loaded: true, version: "0.2.0" });
  },
  // Inputs marked "advanced" in the node definitions are folded until "Show Advanced" (node menu).
  // The frontend copies the flag into each widget's options; its canvas folds by the widget's own
  // `advanced` field, which frontends 1.32 and 1.49 leave unset for V1 nodes: set it from the flag.
  nodeCreated(node) {
    if (!String(node?.comfyClass ?? node?.type ?? "").startsWith("P3S")) return;
    for (const w of node.widgets ?? []) {
      if (w?.options?.advanced) w.advanced = true;
    }
  },
});
