"""The page: a Generate tab and a Store tab, and the named API endpoint ``/generate``. Every
event answers through ``handlers`` or ``store_tab``; a bad setting is one line (``gr.Error``)."""

from __future__ import annotations

import functools
import random
import sys
import traceback

import gradio as gr

from ctrlora_cli.webui import handlers, store_tab
from ctrlora_cli.webui.handlers import NEGATIVE_PRESETS, PROMPT_PRESETS, Row, Session
from engine.errors import CtrloraError, SettingError
from engine.generation.settings import MAX_STEPS, SCHEDULERS

MAX_ROWS = 4  # condition rows on the page (the API takes any number)
ROW_FIELDS = 8  # adapter, source, image, canvas, prep, weight, start, end
NO_PREP = "none"


def one_line(fn):
    """Errors as one line in the app: ours as they are, anything else named, its traceback on the
    server's stderr only."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except SettingError as exc:
            raise gr.Error(f"{exc.setting.replace('_', ' ')}: {exc}", print_exception=False) from None
        except CtrloraError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:  # a bug, or a file gone: the page still gets one line
            traceback.print_exc(file=sys.stderr)
            raise gr.Error(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                           print_exception=False) from None

    return wrapper


def build(session: Session) -> gr.Blocks:
    store = session.store
    bases = handlers.choices(store, "base")
    first_base = bases[0] if bases else None
    adapters = handlers.adapters_for(store, first_base)
    preps = [NO_PREP] + handlers.prep_kinds()

    with gr.Blocks(title="ctrlora", analytics_enabled=False) as app:
        restored = gr.State(None)  # the recipe of a dropped PNG
        count = gr.State(1)  # condition rows shown
        gr.Markdown("## ctrlora: CtrLoRA on Stable Diffusion 1.5")
        with gr.Tab("Generate"):
            with gr.Row():
                base = gr.Dropdown(bases, value=first_base, label="Base")
                sd = gr.Dropdown(handlers.choices(store, "sd"), value=_sd_of(store, first_base), label="SD model")
                recipe_png = gr.File(label="Drop a PNG made by ctrlora to restore its settings",
                                     file_types=[".png"], type="filepath", height=130,
                                     elem_id="restore")
            groups, rows = [], []
            for i in range(MAX_ROWS):
                with gr.Group(visible=i == 0, elem_id=f"condition-{i}") as group:
                    with gr.Row():
                        adapter = gr.Dropdown(adapters, value=adapters[0] if adapters and i == 0 else None,
                                              label=f"Condition {i + 1}: adapter", scale=2,
                                              elem_id=f"adapter-{i}")
                        source = gr.Radio(["upload", "draw"], value="upload", label="Image", scale=1)
                        prep = gr.Dropdown(preps, value=NO_PREP, label="Prep (extract the condition)", scale=1)
                        weight = gr.Slider(0, 2, value=1.0, step=0.05, label="Weight", scale=1)
                        start = gr.Slider(0, 1, value=0.0, step=0.05, label="Start", scale=1)
                        end = gr.Slider(0, 1, value=1.0, step=0.05, label="End", scale=1)
                    with gr.Row():
                        image = gr.Image(type="filepath", format="png", label="Condition image", height=256,
                                         sources=["upload", "clipboard"])
                        canvas = gr.Sketchpad(type="filepath", format="png", label="Draw", height=256,
                                              canvas_size=(512, 512), visible=False,
                                              brush=gr.Brush(colors=["#000000"], default_color="#000000"))
                        shown = gr.Image(label="As the model sees it", height=256, interactive=False)
                groups.append(group)
                rows.append((adapter, source, image, canvas, prep, weight, start, end))
                source.change(lambda s: (gr.update(visible=s == "upload"), gr.update(visible=s == "draw")),
                              source, [image, canvas], api_visibility="private")
                adapter.input(one_line(lambda a: "draw" if handlers.sketch_like(store, a) else "upload"),
                               adapter, source, api_visibility="private")
                show = one_line(lambda s, i, c, p: handlers.preview(_image_of(s, i, c), _prep(p)))
                for trigger in (image.change, canvas.change, prep.change, source.change):
                    trigger(show, [source, image, canvas, prep], shown, api_visibility="private",
                            show_progress="hidden")
            with gr.Row():
                add = gr.Button("Add condition", size="sm")
                drop = gr.Button("Remove last condition", size="sm")
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=2, placeholder="what to draw", elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", lines=2, placeholder="what to avoid")
                with gr.Column(scale=1):
                    prompt_preset = gr.Dropdown(list(PROMPT_PRESETS), value="none", label="Add to prompt")
                    negative_preset = gr.Dropdown(list(NEGATIVE_PRESETS), value="none", label="Negative preset")
            with gr.Row():
                steps = gr.Slider(1, min(MAX_STEPS, 150), value=20, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance")
                scheduler = gr.Dropdown(list(SCHEDULERS), value="ddim", label="Scheduler")
                strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Control strength")
            with gr.Row():
                seed = gr.Number(-1, precision=0, label="Seed (-1: random)", minimum=-1, maximum=2**32 - 1,
                                 elem_id="seed")
                dice = gr.Button("Random seed", size="sm")
                batch = gr.Slider(1, 16, value=1, step=1, label="Images")
                width = gr.Number(0, precision=0, label="Width (0: the first image's)", minimum=0, maximum=4096)
                height = gr.Number(0, precision=0, label="Height (0: the first image's)", minimum=0, maximum=4096)
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(label="Results (download: PNGs with their recipe)", format="png", columns=4,
                                 height=300, buttons=["download", "fullscreen"], elem_id="results",
                                 object_fit="contain", preview=False, fit_columns=False)
            status = gr.Markdown(elem_id="status")
        with gr.Tab("Store"):
            listing = gr.Dataframe(store_tab.table(store), headers=store_tab.COLUMNS, interactive=False,
                                   label="The store (ctrlora list)")
            refresh = gr.Button("Refresh", size="sm")
            with gr.Row():
                to_pull = gr.Dropdown(store_tab.pullable(), allow_custom_value=True, label="Pull (catalog name)")
                pull = gr.Button("Pull")
            to_remove = gr.Dropdown([m.name for m in store.list()], multiselect=True, label="Remove")
            remove = gr.Button("Remove...", variant="stop")
            with gr.Group(visible=False) as confirm:
                question = gr.Markdown()
                with gr.Row():
                    yes = gr.Button("Yes, remove", variant="stop")
                    no = gr.Button("Cancel")
            store_log = gr.Markdown()
        with gr.Column(visible=False):  # the API's own inputs: any number of conditions, names as text
            api_base = gr.Textbox(label="base")
            api_sd = gr.Textbox(label="sd")
            api_conditions = gr.JSON(label="conditions")
            api_images = gr.File(file_count="multiple", label="images")
            api_summary = gr.JSON(label="summary")
            api_go = gr.Button("api")

        # -- Generate --------------------------------------------------------------------------------------
        flat_rows = [c for row in rows for c in row]
        common = [prompt, negative, steps, guidance, scheduler, strength, seed, batch, width, height]

        @one_line
        def run_page(base_name, sd_name, prompt_text, negative_text, steps_n, guidance_v, scheduler_name, strength_v,
                     seed_n, batch_n, width_n, height_n, recipe, shown_rows, *values, progress=gr.Progress()):
            chosen = [values[k * ROW_FIELDS:(k + 1) * ROW_FIELDS] for k in range(shown_rows)]
            conditions = [Row(a, _image_of(s, i, c), _prep(p), w, st, e) for a, s, i, c, p, w, st, e in chosen]
            written, summary = _generate(base_name, sd_name, conditions, recipe, progress, prompt_text, negative_text,
                                         steps_n, guidance_v, scheduler_name, strength_v, seed_n, batch_n, width_n,
                                         height_n)
            return written, _said(summary)

        def _generate(base_name, sd_name, conditions, recipe, progress, prompt_text, negative_text, steps_n,
                      guidance_v, scheduler_name, strength_v, seed_n, batch_n, w, h):
            progress(0, desc="loading")
            return handlers.generate(
                session, base_name, sd_name, conditions, prompt_text, negative_text, steps_n, guidance_v,
                scheduler_name, strength_v, None if seed_n is None or seed_n < 0 else int(seed_n), batch_n,
                int(w or 0), int(h or 0), recipe, progress=_steps(progress), warn=gr.Warning)

        go.click(run_page, [base, sd] + common + [restored, count] + flat_rows, [gallery, status],
                 api_visibility="private", concurrency_id="gpu", concurrency_limit=1)

        @one_line
        def generate(base: str, sd: str, conditions: list[dict], images: list[str], prompt: str, negative: str,
                     steps: int, guidance: float, scheduler: str, strength: float, seed: int, batch: int,
                     width: int, height: int, progress=gr.Progress()):
            """Generate images. conditions: [{"adapter", "weight", "start", "end", "prep"}], one per image
            in images (in order); seed -1: random; width/height 0: the first image's. Returns the PNGs
            (each with its ctrlora recipe) and a summary."""
            conditions, images = conditions or [], images or []
            if len(conditions) != len(images):
                raise CtrloraError(f"give one image per condition ({len(conditions)} conditions, {len(images)} "
                                   f"images)")
            rows_given = [Row(c.get("adapter"), img, c.get("prep"), float(c.get("weight", 1.0)),
                              float(c.get("start", 0.0)), float(c.get("end", 1.0)))
                          for c, img in zip(conditions, images)]
            return _generate(base, sd, rows_given, None, progress, prompt, negative, steps, guidance, scheduler,
                             strength, seed, batch, width, height)

        api_go.click(generate, [api_base, api_sd, api_conditions, api_images] + common, [gallery, api_summary],
                     api_name="generate", concurrency_id="gpu", concurrency_limit=1)

        def show_rows(n):
            return [n] + [gr.update(visible=k < n) for k in range(MAX_ROWS)]

        add.click(lambda n: show_rows(min(n + 1, MAX_ROWS)), count, [count] + groups, api_visibility="private")
        drop.click(lambda n: show_rows(max(n - 1, 1)), count, [count] + groups, api_visibility="private")
        dice.click(lambda: random.randrange(2**31), None, seed, api_visibility="private")
        prompt_preset.input(lambda p, text: ", ".join(t for t in ((text or "").strip(), PROMPT_PRESETS[p]) if t),
                            [prompt_preset, prompt], prompt, api_visibility="private")
        negative_preset.input(lambda p: NEGATIVE_PRESETS[p], negative_preset, negative, api_visibility="private")
        base.input(one_line(lambda b: [gr.update(value=_sd_of(store, b))] + _adapter_choices(store, b, rows)),
                    base, [sd] + [r[0] for r in rows], api_visibility="private")

        @one_line
        def restore(path):
            if not path:
                return [gr.update()] * (13 + MAX_ROWS * (ROW_FIELDS + 1))
            found = handlers.restore(store, path)
            r = found["recipe"]
            head = [r.get("base", {}).get("name"), r.get("sd", {}).get("name"), r.get("prompt", ""),
                    r.get("negative_prompt", ""), r.get("steps"), r.get("guidance"), r.get("scheduler"),
                    r.get("strength", 1.0), r.get("seed"), r.get("width"), r.get("height"), r]
            n = max(1, min(len(found["rows"]), MAX_ROWS))
            if len(found["rows"]) > MAX_ROWS:
                gr.Warning(f"the image used {len(found['rows'])} conditions; the page shows {MAX_ROWS} (the API "
                           f"takes any number)")
            choices = handlers.adapters_for(store, head[0])
            tail = []
            for k in range(MAX_ROWS):
                if k < len(found["rows"]):
                    name, image, w, st, e = found["rows"][k]
                    tail += [gr.update(choices=sorted(set(choices) | {name}), value=name), "upload", image, None,
                             NO_PREP, w, st, e]
                else:
                    tail += [gr.update(choices=choices, value=None), "upload", None, None, NO_PREP, 1.0, 0.0, 1.0]
            return head + [n] + [gr.update(visible=k < n) for k in range(MAX_ROWS)] + tail

        recipe_png.upload(restore, recipe_png, [base, sd, prompt, negative, steps, guidance, scheduler, strength,
                                                seed, width, height, restored, count] + groups + flat_rows,
                          api_visibility="private")

        # -- Store -----------------------------------------------------------------------------------------
        def refreshed(base_name):
            names = [m.name for m in store.list()]
            return [store_tab.table(store), gr.update(choices=names, value=[]),
                    gr.update(choices=handlers.choices(store, "base")), gr.update(choices=handlers.choices(store, "sd"))
                    ] + _adapter_choices(store, base_name, rows, keep=True)

        store_views = [listing, to_remove, base, sd] + [r[0] for r in rows]
        refresh.click(one_line(refreshed), base, store_views, api_visibility="private")

        @one_line
        def do_pull(name, base_name, progress=gr.Progress()):
            said = store_tab.pull(store, name, lambda file, done, total: progress(
                (int(done), int(total) if total else None), desc=file, unit="bytes"))
            return ["\n\n".join(said)] + refreshed(base_name)

        pull.click(do_pull, [to_pull, base], [store_log] + store_views, api_visibility="private")
        remove.click(one_line(lambda names: (gr.update(visible=True), store_tab.removal(store, names))),
                     to_remove, [confirm, question], api_visibility="private")
        no.click(lambda: (gr.update(visible=False), "nothing removed"), None, [confirm, store_log],
                 api_visibility="private")
        yes.click(one_line(lambda names, b: [gr.update(visible=False), store_tab.remove(store, names)] + refreshed(b)),
                  [to_remove, base], [confirm, store_log] + store_views, api_visibility="private")
    return app


def _image_of(source, image, canvas):
    if source == "draw":
        composite = canvas.get("composite") if isinstance(canvas, dict) else canvas
        return handlers.flatten(composite)
    return image


def _prep(value):
    return None if not value or value == NO_PREP else value


def _sd_of(store, base_name):
    return store.get(base_name).sd if base_name and store.exists(base_name) else None


def _adapter_choices(store, base_name, rows, keep: bool = False):
    """Each row's adapter list for ``base_name``; the first row picks the first adapter."""
    choices = handlers.adapters_for(store, base_name)
    if keep:
        return [gr.update(choices=choices) for _ in rows]
    return [gr.update(choices=choices, value=choices[0] if choices and k == 0 else None) for k in range(len(rows))]


def _steps(progress):
    """The engine's progress events as the page's bar: one tick per denoising step."""

    def callback(event):
        if event.task == "denoise" and event.total:
            progress((int(event.completed), int(event.total)), desc="denoising", unit="steps")

    return callback


def _said(summary: dict) -> str:
    seconds = summary["seconds"]
    seeds = ", ".join(str(s) for s in summary["seeds"])
    return (f"{len(summary['images'])} image(s), {summary['width']}x{summary['height']}, seed {seeds}: "
            f"{seconds['per_step']:.3f} s/step; written to {', '.join(summary['images'])}")
