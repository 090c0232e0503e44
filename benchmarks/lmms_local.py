"""lmms-eval's own evaluator runs the repforce wrapper on a small local task of held-out shapes questions.

    pip install -e '.[lmms]'      # in a venv of its own: lmms-eval pulls a CUDA torch
    python benchmarks/lmms_local.py --ckpt shapes --n 6

Writes the task (a JSONL of held-out scenes and one question each, and its YAML) to a temporary
folder, runs `lmms_eval.evaluator.simple_evaluate` with `repforce.lmms.Repforce`, and prints one JSON
line with the task's exact match. Not a test: the test extras do not install lmms-eval
(tests/test_lmms.py tests the wrapper on a stand-in of its base class).
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

from PIL import Image

from repforce import lmms
from repforce.worlds import shapes

TASK = """task: shapes_vqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function shapes_utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="shapes")
    ap.add_argument("--n", type=int, default=6, help="held-out scenes, one question each")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lmms_eval.evaluator import simple_evaluate  # heavy, optional (extra `lmms`)
    from lmms_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for i, scene in enumerate(shapes.scenes("heldout", 0, args.n)):
            q, a = shapes.questions(scene)[0]
            Image.fromarray(shapes.render(scene)).save(tmp / f"{i}.png")
            rows.append({"image": str(tmp / f"{i}.png"), "question": q, "answer": a})
        (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "shapes_utils.py").write_text(
            "from PIL import Image\n\ndef doc_to_visual(doc):\n    return [Image.open(doc['image']).convert('RGB')]\n")
        (tmp / "shapes_vqa.yaml").write_text(TASK.format(data=tmp / "data.jsonl"))
        res = simple_evaluate(model=lmms.Repforce(pretrained=args.ckpt, batch_size=args.n),
                              tasks=["shapes_vqa_local"], task_manager=TaskManager(include_path=str(tmp)),
                              log_samples=False)
    print(json.dumps({"bench": "lmms_local", "ckpt": args.ckpt, "n": args.n,
                      "exact_match": res["results"]["shapes_vqa_local"]["exact_match,none"]}))


if __name__ == "__main__":
    main()
