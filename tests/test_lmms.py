"""The lmms-eval wrapper (repforce.lmms) on the shipped shapes model, and Engine.answer_logprob that it
scores multiple choice with.

The wrapper is built on a stand-in for lmms-eval's base class and registry (the package is heavy
and not in the test extras: installing it pulls a CUDA torch). lmms-eval's own evaluator on a tiny
local task is benchmarks/lmms_local.py, run where lmms-eval is installed.
"""

import abc
import json
import sys
import types
from dataclasses import dataclass

import pytest
from PIL import Image

from repforce import engine as E
from repforce import lmms
from repforce.worlds import shapes


@pytest.fixture(scope="module")
def docs():
    """Held-out scenes, one question each, as a task's documents."""
    out = []
    for scene in shapes.scenes("heldout", 0, 4):
        q, a = shapes.questions(scene)[0]
        out.append({"image": Image.fromarray(shapes.render(scene)), "question": q, "answer": a})
    return out


@pytest.fixture
def stand_in(monkeypatch):
    """lmms-eval's base class, registry and manifest, as small as the wrapper needs; returns the registry."""
    registry = {}

    class lmms_base(abc.ABC):
        def __init__(self):
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @abc.abstractmethod
        def generate_until(self, requests): ...

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests): ...

    def register_model(*names):
        def deco(cls):
            assert issubclass(cls, lmms_base)
            registry.update({n: cls for n in names})
            return cls
        return deco

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None

    mods = {n: types.ModuleType(n) for n in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.api.registry",
                                             "lmms_eval.models", "lmms_eval.models.registry_v2")}
    mods["lmms_eval.api.model"].lmms = lmms_base
    mods["lmms_eval.api.registry"].register_model = register_model
    mods["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    monkeypatch.setattr(lmms, "_built", {})
    return registry


@pytest.fixture(scope="module")
def model(docs):
    """The wrapper's behaviour on the shipped model, with one task of the documents above."""
    w = lmms.Wrapper(pretrained="shapes", batch_size=3, precision="fp32")  # batched == alone to 1e-3 on any host
    w.task_dict = {"shapes_vqa": {"test": docs}}
    return w


@dataclass
class Req:  # lmms-eval's Instance, as far as a model reads it
    args: tuple


def visual(doc):
    return [doc["image"]]


def test_registered_by_name_on_lmms_evals_base(stand_in):
    cls = lmms.Repforce
    assert stand_in == {"repforce": cls} and issubclass(cls, sys.modules["lmms_eval.api.model"].lmms)
    path = lmms.model_manifest().simple_class_path
    assert path == "repforce.lmms.Repforce" and lmms.Repforce is cls  # what lmms-eval imports, built once
    with pytest.raises(AttributeError):
        lmms.Nothing


def test_generate_until_answers_like_the_engine(model, docs):
    eng = model.engine
    want = eng.answer([d["image"] for d in docs], [d["question"] for d in docs], max_new_tokens=16)
    reqs = [Req((f"<image>\n{d['question']}", {"max_new_tokens": 16, "until": ["\n\n"]}, visual, i, "shapes_vqa", "test"))
            for i, d in enumerate(docs)]
    reqs.append(Req((docs[0]["question"], {"max_new_tokens": 16, "until": [want[0][1:]]}, visual, 0, "shapes_vqa", "test")))
    got = model.generate_until(reqs)
    assert got[:-1] == want  # batched 3 + 1, in the requests' order
    assert got[-1] == want[0][:1]  # cut at the task's stop string
    assert sum(g == d["answer"] for g, d in zip(got, docs)) >= 3  # the shipped model answers its world


def test_loglikelihood_scores_the_choices(model, docs):
    d = docs[0]
    choices = sorted({d["answer"], "red", "two", "yes", "square"})
    reqs = [Req((d["question"], f" {c}", visual, 0, "shapes_vqa", "test")) for c in choices]
    got = model.loglikelihood(reqs)
    alone = [model.engine.answer_logprob([d["image"]], [d["question"]], [c])[0] for c in choices]
    # a loss, as lmms-eval's multiple choice takes the smallest: the answer's negative log-probability, batched
    assert [g[1] for g in got] == [a[1] for a in alone] and all(abs(g[0] + a[0]) < 1e-3 for g, a in zip(got, alone))
    greedy = model.engine.answer([d["image"]], [d["question"]])[0]
    assert [g[1] for g in got] == [c == greedy for c in choices]  # is_greedy: exactly the greedy answer
    assert choices[min(range(len(choices)), key=lambda i: got[i][0])] == d["answer"]


def test_requests_without_an_image_are_refused(model):
    with pytest.raises(ValueError, match="this document has none"):
        model.generate_until([Req(("what color?", {}, lambda doc: [], 0, "shapes_vqa", "test"))])
    with pytest.raises(ValueError, match="cannot be scored"):
        model.loglikelihood([Req(("", "red"))])
    with pytest.raises(E.InferenceError, match="empty answer"):
        model.engine.answer_logprob([None], ["q"], [""])
