// Frontend extension of the EasyAnimate pack. Served by ComfyUI at
// /extensions/<pack folder>/js/easyanimate.js (WEB_DIRECTORY = "./web"), hence three levels up
// to reach the app shim.
import { app } from "../../../scripts/app.js";

app.registerExtension({
  name: "EasyAnimate.Core",
});
