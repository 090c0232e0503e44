"""lmms-eval's understanding benchmarks on a repforce model.

    pip install -e '.[lmms]'
    lmms-eval --model repforce --model_args pretrained=runs/s3 --tasks mme,pope --batch_size 16
    lmms-eval --model repforce --model_args pretrained=shapes,device=cpu --tasks TASK --include_path MY_TASKS

`precision` (auto, fp32, bf16) is the Engine's: "auto" takes bf16 on a CPU with fast bf16 matmuls,
where batched and one-at-a-time scores agree only to bf16's precision; pass precision=fp32 to compare.

The package declares the entry point `lmms_eval.models: repforce` (pyproject.toml), through
which lmms-eval finds the model by name; the class is also registered with lmms-eval's
`@register_model("repforce")` when it is first built. It is a "simple" model in lmms-eval's
terms: each request brings its context text and a function giving the document's images.

- `generate_until`: the answer to the context about the document's first image (the model
  reads one image), greedy unless the task asks for a temperature, cut at the task's `until`
  strings, at most `max_new_tokens` (the task's, capped by the one given here).
- `loglikelihood`: (the continuation's negative log-likelihood after the image and context,
  whether greedy decoding gives it), from `Engine.answer_logprob`. Negative, because
  lmms-eval's multiple choice takes the choice of *smallest* value (its models return a loss;
  lmms-eval issue 370), summed over the continuation's tokens.

Measured with lmms-eval 0.7.3 (its CLI, the entry point, a local task of held-out shapes questions:
exact match 1.0 on 6): generation tasks run. Its evaluator turns every model's loglikelihood
results into strings (`unwrap_generation_output`), so its multiple-choice tasks fail there for
any model; `loglikelihood` here is tested against the documented contract. On a CPU-only torch,
the torchvision that pip brings with lmms-eval is a CUDA build that does not import; lmms-eval
needs it only through transformers' image utilities, so uninstalling it is enough.

lmms-eval is heavy and optional: importing this module does not import it. `Repforce`, the
class lmms-eval loads, is built on first access (module `__getattr__`) on lmms-eval's base
class; `Wrapper` holds all of its behaviour and needs no lmms-eval.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from . import engine as E

MODEL_NAME = "repforce"  # the name lmms-eval knows the model by (--model repforce)


class Wrapper:
    """The model behind lmms-eval's interface. Requests are lmms-eval `Instance`s; only their `.args`
    are read. `task_dict` (task -> split -> documents) is filled in by lmms-eval's evaluator."""

    is_simple = True  # lmms-eval: requests carry (context, ..., doc_to_visual, doc_id, task, split)

    def __init__(self, pretrained: str = "shapes", device: str = "cpu", batch_size: int | str = 16,
                 max_new_tokens: int = 128, raw_weights: bool = False, max_batch_size: int | None = None,
                 precision: str = "auto") -> None:
        super().__init__()  # lmms-eval's base sets rank, world size and task_dict
        self.engine = E.load(str(pretrained), device=str(device), ema=not raw_weights, precision=str(precision))
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        self.task_dict = getattr(self, "task_dict", {})

    # ------------------------------------------------------------------ request parts

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _image(self, doc_to_visual, doc) -> Image.Image | str | Path:
        """The document's first image: the model reads one."""
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        for v in visuals:
            if isinstance(v, (Image.Image, str, Path)):
                return v
        raise ValueError(f"{MODEL_NAME} answers questions about an image; this document has none "
                         f"({[type(v).__name__ for v in visuals]})")

    @staticmethod
    def _question(context: str) -> str:
        """The context without lmms-eval's image placeholders: the image has its own positions."""
        return " ".join(context.replace("<image>", " ").split())

    # ------------------------------------------------------------------ lmms-eval's requests

    def generate_until(self, requests) -> list[str]:
        """One answer per request, batched among requests with the same generation options."""
        groups: dict[tuple, list[int]] = {}
        parsed = []
        for i, r in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = r.args[:6]
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            temperature = float(gen_kwargs.get("temperature") or 0) if gen_kwargs.get("do_sample", True) else 0.0
            n_new = min(int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens), self.max_new_tokens)
            parsed.append((self._image(doc_to_visual, self._doc(task, split, doc_id)), self._question(context)))
            groups.setdefault((n_new, temperature, until), []).append(i)
        out: list[str] = [""] * len(requests)
        for (n_new, temperature, until), idx in groups.items():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                texts = self.engine.answer([parsed[i][0] for i in chunk], [parsed[i][1] for i in chunk],
                                           max_new_tokens=n_new, temperature=temperature)
                for i, t in zip(chunk, texts):
                    for stop in until:  # the task's stop strings end the answer
                        t = t.split(stop)[0] if stop else t
                    out[i] = t
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(negative log-likelihood, is greedy) of each request's continuation after its image and context."""
        rows = []
        for r in requests:
            if len(r.args) < 6:
                raise ValueError(f"{MODEL_NAME} scores continuations of a question about an image; a request "
                                 f"without one (e.g. acc_mutual_info's unconditional half) cannot be scored")
            context, target, doc_to_visual, doc_id, task, split = r.args[:6]
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            # the task's target delimiter (a leading space) is not part of the answer: answers are tokenized alone
            rows.append((self._image(doc_to_visual, doc), self._question(context), str(continuation).strip()))
        out = []
        for s in range(0, len(rows), self.batch_size):
            images, questions, answers = zip(*rows[s:s + self.batch_size])
            out.extend((-lp, greedy) for lp, greedy in self.engine.answer_logprob(list(images), list(questions),
                                                                                list(answers)))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} answers one question per image; multi-round tasks are not supported")


# ---------------------------------------------------------------------- lmms-eval's side


def model_manifest():
    """The entry point lmms-eval reads at startup (pyproject: lmms_eval.models)."""
    from lmms_eval.models.registry_v2 import ModelManifest  # heavy, optional: repforce[lmms]

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.Repforce")


_built: dict[str, type] = {}


def __getattr__(name: str):
    """`Repforce`: Wrapper on lmms-eval's base class, registered under MODEL_NAME; built once, on first use."""
    if name != "Repforce":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _built:
        from lmms_eval.api.model import lmms  # heavy, optional: repforce[lmms]
        from lmms_eval.api.registry import register_model  # heavy, optional: repforce[lmms]

        cls = type("Repforce", (Wrapper, lmms), {"__module__": __name__, "__doc__": Wrapper.__doc__})
        _built[name] = register_model(MODEL_NAME)(cls)
    return _built[name]
