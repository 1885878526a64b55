"""hfcompress in the browser: compress a Hub model, look at what it cost, download it or push it to your namespace.

    python spaces/app.py            # http://127.0.0.1:7860 (GRADIO_SERVER_PORT / GRADIO_SERVER_NAME are honoured)

The same folder deploys as a Hugging Face Space (README.md holds the front matter with `hf_oauth`). On a Space each
user signs in with Hugging Face and runs with their own token; run locally, each browser session types its own
token into a password field (Gradio's local stand-in for the sign-in button would give every session the same one).
"""

from pathlib import Path
from typing import Any

import gradio as gr

from hfcompress.context import Cancelled
from hfcompress.errors import HfCompressError
from hfcompress.hub import push
from hfcompress.registry import available_methods
from hfcompress.space import (
    BUILTIN,
    DEFAULT_STEP,
    QUEUE_SIZE,
    archive,
    cancel_flag,
    clear_session,
    default_target,
    error_text,
    method_form,
    on_a_space,
    run_recipe,
    step_from_form,
    steps_yaml,
)

METHODS = list(available_methods())
FORMS = {method: method_form(method) for method in METHODS}
PROGRESS = gr.Progress()  # Gradio finds the progress bar by this default value and gives each call its own
PLOT_FILES = ("sparsity_map", "block_bits", "block_importance", "layer_drop_scores", "rank_map")


def _input(method: str, field) -> gr.components.Component:
    """The Gradio input for one option, labelled with its name as the CLI and recipes spell it."""
    common = {"label": field.name, "info": field.help, "elem_id": f"{method}-{field.name}"}
    if field.kind == "dropdown":
        return gr.Dropdown(list(field.choices), value=field.default, **common)
    if field.kind == "checkbox":
        return gr.Checkbox(value=field.default, **common)
    if field.kind in ("integer", "number"):
        return gr.Number(value=field.default, precision=0 if field.kind == "integer" else None, **common)
    return gr.Textbox(value=field.default, placeholder="default", **common)


def _current_step(method: str, values: tuple) -> dict[str, Any]:
    """The step the form shows: `values` are every method's inputs, in FORMS order."""
    start = sum(len(FORMS[m]) for m in METHODS[:METHODS.index(method)])
    own = values[start:start + len(FORMS[method])]
    return step_from_form(method, {field.name: value for field, value in zip(FORMS[method], own, strict=True)})


def _token(typed: str | None, oauth: gr.OAuthToken | None) -> str | None:
    """This session's token: the signed-in user's on a Space, else what this session typed (never stored)."""
    if on_a_space():
        return oauth.token if oauth is not None else None
    return (typed or "").strip() or None


def build_app() -> gr.Blocks:
    with gr.Blocks(title="hfcompress") as demo:
        gr.Markdown("# hfcompress\nCompress a model (prune, quantize, decompose, drop layers), measure it, push it.")
        with gr.Row():
            if on_a_space():
                gr.LoginButton()
            token = gr.Textbox(label="Hub token (this browser session only; needed to push or read gated models)",
                               type="password", visible=not on_a_space(), elem_id="token")
        with gr.Row():
            model = gr.Dropdown([BUILTIN], value=BUILTIN, allow_custom_value=True, scale=3, elem_id="model",
                                label="model: Hub repo id, local folder, or the built-in SmolLM2-135M")
            query = gr.Textbox(label="search the Hub", scale=2, elem_id="query")
            search = gr.Button("Search", scale=1)
        with gr.Group():
            method = gr.Dropdown(METHODS, value=DEFAULT_STEP["method"], label="method", elem_id="method")
            inputs, groups = [], []
            for name in METHODS:
                with gr.Group(visible=name == DEFAULT_STEP["method"]) as group:
                    inputs += [_input(name, field) for field in FORMS[name]]
                groups.append(group)
            with gr.Row():
                add = gr.Button("Add step to the recipe")
                remove = gr.Button("Remove last step")
        steps = gr.State([])
        recipe_view = gr.Code(language="yaml", label="recipe (steps run in order; Run with none added runs the form's "
                                                     "step)", interactive=False, lines=1, max_lines=24,
                              elem_id="recipe")
        with gr.Accordion("calibration", open=False, elem_id="calibration"):
            calib_source = gr.Textbox("builtin", label="source: builtin, a datasets id (image-caption pairs for CLIP "
                                      "or LLaVA models), or a .txt/.jsonl path",
                                      elem_id="calib-source")
            n_samples = gr.Number(16, label="n_samples", precision=0, elem_id="n-samples")
            seq_len = gr.Number(256, label="seq_len", precision=0, elem_id="seq-len")
        with gr.Row():
            target = gr.Textbox(label="push to (default: {user}/{model}-{method})", elem_id="target")
            private = gr.Checkbox(True, label="private")
        with gr.Row():
            run = gr.Button("Run", variant="primary", elem_id="run")
            cancel = gr.Button("Cancel", elem_id="cancel")
        status = gr.Markdown("Pick a model and a method, then Run.", elem_id="status", min_height=60, container=True,
                             padding=True)
        table = gr.Markdown(elem_id="table")
        plots = gr.Gallery(label="plots", columns=3, height=320, preview=False, object_fit="contain")
        download = gr.File(label="download the result")
        with gr.Accordion("model card", open=False):
            card = gr.Markdown()
        push_button = gr.Button("Push to the Hub", elem_id="push")
        pushed = gr.Markdown(elem_id="pushed")
        result_folder = gr.State(None)

        calibration_inputs = [calib_source, n_samples, seq_len]

        def show_recipe(model_id, steps_now, source, samples, length):
            return steps_yaml(model_id, steps_now, _calibration(source, samples, length))

        def switch(name):
            return [gr.update(visible=m == name) for m in METHODS]

        def add_step(model_id, steps_now, name, *values):
            try:
                steps_now = [*steps_now, _current_step(name, values[:len(inputs)])]
            except HfCompressError as error:
                return steps_now, gr.update(), f"**Not added:** {error_text(error)}"
            return steps_now, show_recipe(model_id, steps_now, *values[len(inputs):]), ""

        def remove_step(model_id, steps_now, *calibration):
            steps_now = steps_now[:-1]
            return steps_now, show_recipe(model_id, steps_now, *calibration)

        def find(text):
            if not text.strip():
                return gr.update(), ""
            try:
                from huggingface_hub import HfApi

                found = [m.id for m in HfApi().list_models(search=text.strip(), limit=20, sort="downloads")]
            except Exception as error:  # offline, or the Hub is down: the picker keeps working with typed ids
                return gr.update(), f"Hub search is not available here ({type(error).__name__}); type a repo id."
            plural = "" if len(found) == 1 else "s"
            return gr.update(choices=[BUILTIN, *found]), f"{len(found)} model{plural} found on the Hub."

        def start(request: gr.Request, oauth: gr.OAuthToken | None, profile: gr.OAuthProfile | None,
                  progress=PROGRESS, *values):
            # Gradio passes the session, the sign-in and the progress bar first, then the inputs in order
            model_id, steps_now, name = values[:3]
            field_values = values[3:3 + len(inputs)]
            source, samples, length, typed, target_now = values[3 + len(inputs):]
            empty = (None, "", [], None, "")
            try:
                recipe_steps = steps_now or [_current_step(name, field_values)]
                result = run_recipe(model_id, recipe_steps, _calibration(source, samples, length),
                                    request.session_hash, token=_token(typed, oauth),
                                    progress=lambda fraction, desc="": progress(fraction, desc=desc))
            except Cancelled:
                return ("Cancelled; nothing was written.", *empty, target_now)
            except Exception as error:  # bad options, missing or gated repos, too large: said, and the app goes on
                return (f"**Error:** {error_text(error)}", *empty, target_now)
            folder = Path(result.folder)
            images = [str(folder / result.metadata["plots"][key]) for key in PLOT_FILES
                      if key in result.metadata.get("plots", {})]
            card_text = (folder / "README.md").read_text(encoding="utf-8").split("\n---\n", 1)[-1]
            user = profile.username if on_a_space() and profile is not None else _whoami(_token(typed, oauth))
            return ("Compressed and saved: compare the columns below, then download or push.", str(folder),
                    result.table, gr.update(value=images, columns=max(1, min(3, len(images)))), archive(folder),
                    card_text,
                    target_now or default_target(user, model_id, recipe_steps))

        def stop(request: gr.Request):
            cancel_flag(request.session_hash).set()
            return "Cancelling: the run stops after the block it is working on; nothing will be written."

        def upload(folder, repo, private_repo, typed, oauth: gr.OAuthToken | None = None):
            if not folder:
                return "Run a recipe first: there is nothing to push yet."
            token_now = _token(typed, oauth)
            if token_now is None:
                return ("Sign in with Hugging Face first." if on_a_space() else
                        "Paste a Hub token with write access in the token field first.")
            try:
                url = push(folder, repo, private=private_repo, token=token_now)
            except Exception as error:
                return f"**Push failed:** {error_text(error)} The result is kept: fix this and push again."
            return f"Pushed to `{repo}`: {url}"

        method.change(switch, method, groups)
        add.click(add_step, [model, steps, method, *inputs, *calibration_inputs], [steps, recipe_view, status])
        remove.click(remove_step, [model, steps, *calibration_inputs], [steps, recipe_view])
        search.click(find, query, [model, status])
        run_event = run.click(start, [model, steps, method, *inputs, *calibration_inputs, token, target],
                              [status, result_folder, table, plots, download, card, target], show_progress_on=[status])
        cancel.click(stop, None, status, queue=False)
        push_button.click(upload, [result_folder, target, private, token], pushed)
        demo.unload(forget)
        del run_event
    return demo


def forget(request: gr.Request) -> None:
    """A closed tab: its results and cancel flag go."""
    clear_session(request.session_hash)


def _whoami(token: str | None) -> str | None:
    """The name the typed token belongs to (for the default target repo), or None when it cannot be asked."""
    if token is None:
        return None
    try:
        from huggingface_hub import whoami

        return whoami(token=token)["name"]
    except Exception:
        return None


def _calibration(source: str, samples: float | None, length: float | None) -> dict[str, Any]:
    return {"source": source or "builtin", "n_samples": int(samples or 16), "seq_len": int(length or 256)}


if __name__ == "__main__":
    build_app().queue(default_concurrency_limit=1, max_size=QUEUE_SIZE).launch()
