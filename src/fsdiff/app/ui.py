"""The page: gradio layout and wiring only. Every control calls a function of :mod:`fsdiff.app.actions` on the
caller's session and shows what it returns; errors become a message in the page (status line and a toast),
never a traceback.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from functools import wraps
from typing import Any

import gradio as gr

from fsdiff.app import actions, jobs
from fsdiff.app.annotations import BACKGROUND_HEX, OBJECT_HEX
from fsdiff.app.models import DEFAULT_ENCODER, encoder_choices, method_choice, method_choices
from fsdiff.app.core import CACHE_SWEEP, AppCore
from fsdiff.app.uploads import IMAGE_SUFFIXES, discard_upload
from fsdiff.errors import FsdiffError

log = logging.getLogger("fsdiff.app")

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial",
                "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
THEME = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)
"""gradio's default look with system fonts: its stock fonts come from a web font service."""

INTRO = """# fsdiff: segment a class in your photos from a few examples
**1.** Add one or more *support* images and mark the object on each (paint it, drag a box with two clicks,
scribble, click points, or upload a mask). **2.** Upload the *queries* and press **Segment**. **3.** Fix a
result with the brush and add it as a support: the other queries are segmented again with one more example.
**4.** Export PNG masks and COCO json. A bundled example is loaded: press **Segment** to see it work."""

PRIVATE: dict[str, Any] = {"api_visibility": "private"}
MODEL: dict[str, Any] = {"concurrency_limit": 1, "concurrency_id": jobs.QUEUE_ID}


def ok(text: str) -> str:
    """A status line for a finished action."""
    return text


def problem(text: str) -> str:
    """A status line for refused input."""
    return f"**Cannot do that:** {text}"


def guarded(n_outputs: int, clear: tuple[int, ...] = ()) -> Callable:
    """Run a handler; on bad input leave every output as it is (except those in ``clear``, emptied: a refused
    upload) and put the message in the status line (the last output)."""
    def wrap(fn: Callable) -> Callable:
        @wraps(fn)
        def inner(*args: Any, **kwargs: Any):
            try:
                return fn(*args, **kwargs)
            except FsdiffError as exc:
                message = str(exc)
            except Exception as exc:  # a bug must not take the page down: say what failed, log the traceback
                log.error("app handler %s failed:\n%s", fn.__name__, traceback.format_exc())
                message = f"internal error ({type(exc).__name__}: {exc}); the server log has the details."
            gr.Warning(message)
            skipped = [None if i in clear else gr.skip() for i in range(n_outputs - 1)]
            return (*skipped, problem(message)) if n_outputs > 1 else problem(message)
        return inner
    return wrap


def launch_options(core: AppCore) -> dict[str, Any]:
    """``Blocks.launch`` keywords the app always uses."""
    return {"max_file_size": f"{core.config.max_file_mb}mb", "ssr_mode": False, "show_error": False,
            "quiet": True, "footer_links": ["api", "settings"], "enable_monitoring": False, "mcp_server": False,
            "pwa": False}


def build_blocks(core: AppCore) -> gr.Blocks:
    """The app's page for ``core`` (its sessions, models and limits)."""
    cfg = core.config

    def session(request: gr.Request):
        return core.store.get(request.session_hash if request is not None else "")

    def gallery(s, slot: str, pictures: list) -> list:
        return s.render(slot, pictures)

    def single(s, slot: str, array, fmt: str = "jpg") -> str | None:
        return None if array is None else s.render(slot, [(array, "")], fmt)[0][0]

    def editor_value(s, slot: str, value: dict | None) -> dict | None:
        if value is None:
            return None
        bg = single(s, f"{slot}-bg", value["background"])
        layers = [p for p, _ in s.render(f"{slot}-layers", [(x, "") for x in value.get("layers", [])], "png")]
        return {"background": bg, "layers": layers, "composite": None}

    def methods_md(name: str) -> str:
        return method_choice(name).message()

    choices = method_choices()
    method_options = [(c.label, c.name) for c in choices]

    with gr.Blocks(title="fsdiff", analytics_enabled=False, delete_cache=CACHE_SWEEP) as demo:
        gr.Markdown(INTRO)
        status = gr.Markdown("", elem_id="status")
        tool = gr.State("paint")
        with gr.Row():
            with gr.Column(scale=2):
                gr.Markdown("### 1. Supports")
                support_file = gr.File(label="Support image", file_types=list(IMAGE_SUFFIXES), type="filepath",
                                       height=110, elem_id="support-file")
                with gr.Tabs():
                    with gr.Tab("Paint", id="paint") as tab_paint:
                        paint_mode = gr.Radio(list(actions.PAINT_MODES), value="mask", label="Painting gives a",
                                              info="mask: the green area is the object (red or the eraser removes). "
                                                   "scribbles: green strokes on the object, red on the background.",
                                              elem_id="paint-mode")
                        editor = gr.ImageEditor(label="Paint on the support", sources=(), type="numpy",
                                                image_mode="RGBA", layers=False, transforms=(), format="png",
                                                brush=gr.Brush(colors=[OBJECT_HEX, BACKGROUND_HEX],
                                                               default_color=OBJECT_HEX, color_mode="fixed"),
                                                eraser=gr.Eraser(), elem_id="support-editor")
                    with gr.Tab("Box / clicks", id="clicks") as tab_clicks:
                        click_mode = gr.Radio(list(actions.CLICK_MODES), value="box corners", label="A click adds a",
                                              info="box corners: click two opposite corners of the object.",
                                              elem_id="click-mode")
                        click_image = gr.Image(label="Click on the support", interactive=False, type="filepath",
                                               elem_id="support-clicks", buttons=[])
                        clear_clicks = gr.Button("Clear clicks", size="sm", elem_id="clear-clicks")
                    with gr.Tab("Mask file", id="mask file") as tab_mask:
                        mask_file = gr.File(label="Mask PNG (0/255 or 0/1, the support's size)",
                                            file_types=[".png", ".bmp", ".tif", ".tiff"], type="filepath",
                                            elem_id="mask-file")
                class_name = gr.Textbox(label="Class name (optional)", placeholder="e.g. fish", elem_id="class-name")
                add_support = gr.Button("Add support", variant="primary", elem_id="add-support")
                supports = gr.Gallery(label="Supports (K shots)", columns=3, height=260, allow_preview=False, object_fit="contain",
                                      elem_id="supports", buttons=[])
                remove_support = gr.Button("Remove selected support", size="sm", elem_id="remove-support")
            with gr.Column(scale=3):
                gr.Markdown("### 2. Queries")
                query_files = gr.File(label="Query images, or a zip of images", file_count="multiple",
                                      file_types=[*IMAGE_SUFFIXES, ".zip"], type="filepath", height=110,
                                      elem_id="query-files")
                with gr.Row():
                    method = gr.Dropdown(method_options, value="prototype", label="Method", elem_id="method")
                    encoder = gr.Dropdown(encoder_choices(), value=DEFAULT_ENCODER, label="Encoder", elem_id="encoder")
                method_info = gr.Markdown(methods_md("prototype"), elem_id="method-info")
                with gr.Row():
                    run = gr.Button("Segment", variant="primary", elem_id="run")
                    clear_queries = gr.Button("Clear queries", elem_id="clear-queries")
                with gr.Row():
                    threshold = gr.Slider(0.01, 0.99, value=0.5, step=0.01, label="Threshold", elem_id="threshold")
                    view = gr.Radio(list(actions.VIEWS), value="overlay", label="Show", elem_id="view")
                results = gr.Gallery(label="Results (select one to correct it)", columns=3, height=420, object_fit="contain",
                                     allow_preview=False, elem_id="results", buttons=[])
                gr.Markdown("### 3. Correct the selected result and add it as a support")
                correct_editor = gr.ImageEditor(label="Correct the mask (green = object; eraser or red removes)",
                                                sources=(), type="numpy", image_mode="RGBA", layers=False,
                                                transforms=(), format="png",
                                                brush=gr.Brush(colors=[OBJECT_HEX, BACKGROUND_HEX],
                                                               default_color=OBJECT_HEX, color_mode="fixed"),
                                                eraser=gr.Eraser(), elem_id="correct-editor")
                add_corrected = gr.Button("Add as support and re-segment the others", elem_id="add-corrected")
                gr.Markdown("### 4. Export")
                export = gr.Button("Export masks (zip: PNG masks + COCO json)", elem_id="export")
                export_file = gr.File(label="Download", interactive=False, elem_id="export-file")
        with gr.Column(visible=False):
            api_supports = gr.File(file_count="multiple", type="filepath", label="supports")
            api_ann_files = gr.File(file_count="multiple", type="filepath", label="annotation_files")
            api_annotations = gr.Textbox(label="annotations")
            api_queries = gr.File(file_count="multiple", type="filepath", label="queries")
            api_class = gr.Textbox(label="class_name")
            api_method = gr.Textbox(value="prototype", label="method")
            api_encoder = gr.Textbox(value="", label="encoder")
            api_threshold = gr.Number(value=None, label="threshold")
            api_zip = gr.File(label="zip")
            api_summary = gr.JSON(label="summary")
            api_methods = gr.JSON(label="methods")
            api_go = gr.Button("segment_files")
            api_list = gr.Button("methods")

        # ------------------------------------------------------------------ page load / unload
        @guarded(5)
        def on_load(request: gr.Request):
            s = session(request)
            actions.load_example(s, cfg)
            return (gallery(s, "supports", actions.support_pictures(s)), gallery(s, "results", actions.result_pictures(s)),
                    s.class_name, s.threshold,
                    ok(f"Example loaded ({len(s.supports)} support, {len(s.queries)} queries): press **Segment**."))

        demo.load(on_load, None, [supports, results, class_name, threshold, status], **PRIVATE)

        def on_unload(request: gr.Request):
            core.store.close(request.session_hash)

        demo.unload(on_unload)

        # ------------------------------------------------------------------ supports
        tab_paint.select(lambda: "paint", None, tool, **PRIVATE)
        tab_clicks.select(lambda: "clicks", None, tool, **PRIVATE)
        tab_mask.select(lambda: "mask file", None, tool, **PRIVATE)

        @guarded(4, clear=(2,))
        def on_support_file(path, request: gr.Request):
            s = session(request)
            try:
                if not path:
                    return gr.skip(), gr.skip(), gr.skip(), ""
                pic = actions.set_support_image(s, path, cfg)
            finally:
                discard_upload(path, core.root)
            bg = single(s, "draft", pic.display)
            return ({"background": bg, "layers": [], "composite": bg}, bg, None,
                    ok(f"Support image {pic.name} ({pic.shape[1]}x{pic.shape[0]}): mark the object, then **Add support**."))

        support_file.upload(on_support_file, support_file, [editor, click_image, support_file, status], **PRIVATE)

        @guarded(2)
        def on_click(mode: str, evt: gr.SelectData, request: gr.Request):
            s = session(request)
            x, y = evt.index
            return single(s, "clicks", actions.click(s, float(x), float(y), mode)), ""

        click_image.select(on_click, click_mode, [click_image, status], **PRIVATE)

        @guarded(2)
        def on_clear_clicks(request: gr.Request):
            s = session(request)
            return single(s, "clicks", actions.clear_clicks(s)), ok("Clicks cleared.")

        clear_clicks.click(on_clear_clicks, None, [click_image, status], **PRIVATE)

        @guarded(5)
        def on_add_support(tool_name: str, mode: str, value, mask_path, request: gr.Request):
            s = session(request)
            try:
                item = actions.add_support(s, tool_name, mode, value, mask_path, cfg)
            finally:
                if tool_name == "mask file":
                    discard_upload(mask_path, core.root)
            n = len(s.supports)
            return (gallery(s, "supports", actions.support_pictures(s)), None, None, None,
                    ok(f"Added support {n}: {item.picture.name} ({actions.describe(item)}). K = {n}."))

        add_support.click(on_add_support, [tool, paint_mode, editor, mask_file],
                          [supports, editor, click_image, mask_file, status], **PRIVATE)

        def on_support_select(evt: gr.SelectData, request: gr.Request):
            session(request).selected_support = int(evt.index)

        supports.select(on_support_select, None, None, **PRIVATE)

        @guarded(2)
        def on_remove_support(request: gr.Request):
            s = session(request)
            actions.remove_support(s, s.selected_support)
            return gallery(s, "supports", actions.support_pictures(s)), ok(f"Support removed; K = {len(s.supports)}.")

        remove_support.click(on_remove_support, None, [supports, status], **PRIVATE)

        # ------------------------------------------------------------------ queries, method, run
        @guarded(3, clear=(1,))
        def on_queries(paths, request: gr.Request):
            s = session(request)
            paths = list(paths or [])
            try:
                n = actions.add_queries(s, paths, cfg)
            finally:
                for p in paths:
                    discard_upload(p, core.root)
            return (gallery(s, "results", actions.result_pictures(s)), None,
                    ok(f"Added {n} quer{'y' if n == 1 else 'ies'}; {len(s.queries)} in all. Press **Segment**."))

        query_files.upload(on_queries, query_files, [results, query_files, status], **PRIVATE)

        @guarded(2)
        def on_clear_queries(request: gr.Request):
            s = session(request)
            actions.clear_queries(s)
            return gallery(s, "results", []), ok("Queries cleared.")

        clear_queries.click(on_clear_queries, None, [results, status], **PRIVATE)

        @guarded(1)
        def on_method(name: str):
            return methods_md(name)

        method.change(on_method, method, method_info, **PRIVATE)

        def progress_fn(progress: gr.Progress):
            return lambda done, total: progress((done, total), desc="Segmenting", unit="queries")

        @guarded(4)
        def on_run(name: str, enc: str, cls: str, request: gr.Request, progress=gr.Progress()):
            s = session(request)
            summary = actions.segment(s, core.models, name, enc, cls or "", progress_fn(progress))
            return (gallery(s, "results", actions.result_pictures(s)), gallery(s, "supports", actions.support_pictures(s)),
                    s.threshold, ok(summary))

        run.click(on_run, [method, encoder, class_name], [results, supports, threshold, status], **PRIVATE, **MODEL)

        @guarded(2)
        def on_threshold(t: float, request: gr.Request):
            s = session(request)
            actions.set_threshold(s, t)
            return gallery(s, "results", actions.result_pictures(s)), gr.skip()

        threshold.change(on_threshold, threshold, [results, status], trigger_mode="always_last", **PRIVATE)

        @guarded(2)
        def on_view(v: str, request: gr.Request):
            s = session(request)
            actions.set_view(s, v)
            return gallery(s, "results", actions.result_pictures(s)), gr.skip()

        view.change(on_view, view, [results, status], **PRIVATE)

        # ------------------------------------------------------------------ correct and add
        @guarded(2)
        def on_result_select(evt: gr.SelectData, request: gr.Request):
            s = session(request)
            value = actions.select_result(s, int(evt.index))
            name = s.queries[int(evt.index)].picture.name
            return editor_value(s, "correct", value), ok(f"Correct {name} below, then add it as a support.")

        results.select(on_result_select, None, [correct_editor, status], **PRIVATE)

        @guarded(5)
        def on_add_corrected(value, name: str, enc: str, cls: str, request: gr.Request, progress=gr.Progress()):
            s = session(request)
            summary = actions.add_corrected(s, value, core.models, name, enc, cls or "", cfg, progress_fn(progress))
            return (gallery(s, "results", actions.result_pictures(s)), gallery(s, "supports", actions.support_pictures(s)),
                    None, s.threshold, ok(summary))

        add_corrected.click(on_add_corrected, [correct_editor, method, encoder, class_name],
                            [results, supports, correct_editor, threshold, status], **PRIVATE, **MODEL)

        # ------------------------------------------------------------------ export
        @guarded(2)
        def on_export(request: gr.Request):
            s = session(request)
            path = actions.export(s)
            return str(path), ok("Export ready: one NAME_mask.png per query, annotations.coco.json (RLE) and "
                                 "annotations_polygons.coco.json.")

        export.click(on_export, None, [export_file, status], **PRIVATE)

        # ------------------------------------------------------------------ scripting API (gradio_client)
        def api_segment_files(sup, ann_files, annotations, queries, cls, name, enc, t, request: gr.Request,
                              progress=gr.Progress()):
            """Segment queries from annotated supports in one call; returns the export zip and a JSON summary."""
            s = session(request)
            uploaded = [*(sup or []), *(ann_files or []), *(queries or [])]
            try:
                path, summary = actions.segment_files(
                    s, core.models, cfg, list(sup or []), list(ann_files or []), annotations or "",
                    list(queries or []), cls or "", name or "prototype", enc or DEFAULT_ENCODER,
                    None if t in (None, "") else float(t), progress_fn(progress))
            except FsdiffError as exc:
                raise gr.Error(str(exc)) from None
            finally:
                for p in uploaded:
                    discard_upload(p, core.root)
            return str(path), summary

        api_go.click(api_segment_files, [api_supports, api_ann_files, api_annotations, api_queries, api_class,
                                         api_method, api_encoder, api_threshold], [api_zip, api_summary],
                     api_name="segment_files", **MODEL)

        def api_list_methods():
            """Every method, whether it can run here, and what to download if not."""
            return [{"name": c.name, "ready": c.ready, "summary": c.summary, "detail": c.detail}
                    for c in method_choices()]

        api_list.click(api_list_methods, None, api_methods, api_name="methods")
    return demo
