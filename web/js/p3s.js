// P3S for ComfyUI: frontend extension (loaded by the ComfyUI frontend from WEB_DIRECTORY).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "p3s.core",
  async setup() {
    // A marker the browser tests read to prove this script was served and ran.
    window.__p3s = Object.assign(window.__p3s || {}, { loaded: true, version: "0.1.0" });
  },
});
