"""The web app of `repforce serve` (Gradio): a Generate tab and an Ask tab over the server's Service.

    repforce serve --ckpt shapes        # then open http://127.0.0.1:7860

Generate shows each image beside the rep-token map that guided it (each cell painted with the mean
color of the image cells its id stands for, as report.html does) and, on the shapes world, what the
exact judge reads in it. Ask answers a question about an uploaded or picked image, or captions it.
Both go through the same batcher as the API, so people and programs share batches.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .service import DEFAULT, BadRequest, QueueFull, Service
from .study.report import prototype_colors, rep_map
from .worlds import shapes, shapeseval

SHOW = 160  # pixels a generated image and its rep map are drawn at in the gallery


def _big(img: np.ndarray, side: int = SHOW) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((side, side), Image.NEAREST))


def reading(prompt: str, img: np.ndarray) -> str:
    """What the shapes world's judge sees in an image, and its verdict when the prompt is a ShapesEval one."""
    dets = shapeseval.parse(img)
    seen = ", ".join(f"{d.color} {d.shape or 'blob'}" for d in dets) or "nothing"
    p = shapeseval.find_prompt(prompt)
    if p is None:
        return f"judge sees: {seen}"
    ok, why = shapeseval.judge(p, dets, img.shape[0])
    return f"{'correct' if ok else 'wrong: ' + why} (judge sees: {seen})"


def _examples(folder: Path, n: int = 6) -> list[str]:
    """Held-out scenes of the shapes world saved as PNGs, for the Ask tab to pick from."""
    out = []
    for k, scene in enumerate(shapes.scenes("heldout", 0, n, 32)):
        path = folder / f"scene_{k}.png"
        Image.fromarray(shapes.render(scene)).resize((128, 128), Image.NEAREST).save(path)
        out.append(str(path))
    return out


def build(service: Service):
    """The app (a gradio.Blocks) over a Service."""
    import gradio as gr  # heavy, optional (repforce[serve]): imported only when serving

    eng = service.engine
    colors = prototype_colors(eng) if eng.cfg.has_gen and eng.cfg.rep_ids else None
    shapes_world = eng.cfg.image_size == 32 and eng.cfg.image_channels == 3
    lim = service.limits

    def generate(prompt, n, steps, guidance, rep_guidance, seed, progress=gr.Progress()):
        progress(0.0, desc="waiting for a batch")
        try:
            o = service.options(int(steps), float(guidance), float(rep_guidance))
            out = service.generate(prompt, int(n), None if seed is None or seed < 0 else int(seed), o).result()
        except (BadRequest, QueueFull) as e:
            raise gr.Error(str(e), print_exception=False) from None
        items = []
        for g in out:
            pic = _big(g.image)
            if colors is not None:
                pic = np.concatenate([pic, np.full((SHOW, 8, 3), 255, np.uint8), _big(rep_map(g.rep, colors, 32))], 1)
            items.append((pic, reading(prompt, g.image) if shapes_world else prompt))
        return items

    def ask(image, question, caption=False):
        if image is None:
            raise gr.Error("upload or pick an image first", print_exception=False)
        try:
            return service.answer(image, "" if caption else question or "").result()[0]
        except (BadRequest, QueueFull) as e:
            raise gr.Error(str(e), print_exception=False) from None

    side = eng.cfg.image_size
    with gr.Blocks(analytics_enabled=False, title=f"repforce: {service.name}") as app:
        gr.Markdown(f"# repforce: `{service.name}`\n{eng.cfg.variant} model, {side}x{side} images. "
                    "The same model generates and understands. API: `/v1/images/generations`, "
                    "`/v1/chat/completions`, `/v1/models`.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="prompt", value="a red circle", max_length=lim.max_prompt_chars,
                                        elem_id="prompt")
                    n = gr.Slider(1, lim.max_n, value=4, step=1, label="images")
                    steps = gr.Slider(1, lim.max_steps, value=DEFAULT.steps, step=1, label="ODE steps")
                    guidance = gr.Slider(0, 10, value=DEFAULT.cfg, step=0.5, label="pixel guidance (text and reps)")
                    rep_guidance = gr.Slider(0, 10, value=DEFAULT.rep_cfg, step=0.5, label="rep-token guidance")
                    seed = gr.Number(value=0, precision=0, label="seed (-1 = random)")
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="image | rep tokens that guided it" if colors is not None else "images",
                                         columns=2, height=560, object_fit="contain", format="png",
                                         elem_id="gallery")
            go.click(generate, [prompt, n, steps, guidance, rep_guidance, seed], gallery)
            prompt.submit(generate, [prompt, n, steps, guidance, rep_guidance, seed], gallery)
        with gr.Tab("Ask"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="pil", label="image", sources=["upload", "clipboard"], height=256,
                                     elem_id="ask-image")
                    if shapes_world:
                        gr.Examples(_examples(Path(tempfile.mkdtemp(prefix="repforce-examples-"))), image,
                                    label="held-out scenes")
                with gr.Column():
                    question = gr.Textbox(label="question", value="what color is the circle?",
                                          max_length=lim.max_prompt_chars, elem_id="question")
                    with gr.Row():
                        ask_btn = gr.Button("Ask", variant="primary", elem_id="ask")
                        cap_btn = gr.Button("Caption", elem_id="caption")
                    answer = gr.Textbox(label="answer", interactive=False, elem_id="answer")
            ask_btn.click(ask, [image, question], answer)
            question.submit(ask, [image, question], answer)
            cap_btn.click(lambda im: ask(im, "", True), [image], answer)
    app.queue(default_concurrency_limit=16, max_size=lim.max_queue)  # concurrent users meet in the batcher
    return app
