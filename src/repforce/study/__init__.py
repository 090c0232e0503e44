"""The experiment harness: the paper's ablation on the small worlds, its results and reports, the demo.

    ablation.py  the controlled study (Table 3), resumable run by run     repforce study ablation
    results.py   docs/RESULTS.md from the recorded result JSONs           repforce study report
    evaluate.py  ShapesEval, VQA, captions and Fashion-MNIST scores of a model
    report.py    loss curves, rep-token maps and report.html
    demo.py      the 10-minute end-to-end demo                              repforce demo
"""
