"""The tokenizer and the prior as MLflow models with a pyfunc flavor, built with MLflow's
models-from-code: MLflow saves these modules' source (`tokenizer_model.py`, `prior_model.py`)
with the export files and the `components` package, and runs the source when a model is loaded:
nothing is pickled.

    model = mlflow.pyfunc.load_model("models:/vqpipe-tokenizer@champion")
    tokens = model.predict(images)         # uint8 (n, H, W, 3), or float (n, 3, H, W) in [0, 1]
    prior = mlflow.pyfunc.load_model("models:/vqpipe-prior@champion")
    drawn = prior.predict(pd.DataFrame({"class": [3, 3, 7]}), params={"output": "images", "guidance_scale": 2.0})
"""
