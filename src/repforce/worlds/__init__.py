"""The small worlds the method is proven on, with their exact judges: shapes, ShapesEval, Fashion-MNIST.

    shapes.py      the procedural scenes, their captions and questions
    shapeseval.py  ShapesEval, the GenEval of that world, and its deterministic judge
    fashion.py     Fashion-MNIST as a second world of real photos, and its CNN judge
    metrics.py     VQA and caption exact match on held-out scenes

The method (model, engine, trainer) never imports them; data.py (batches and the worlds' tokenizer)
and the study do.
"""
