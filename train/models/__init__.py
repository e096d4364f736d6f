"""Model code.

The sequence models' modules (`SEQUENCE_MODULES`) import only torch, fast-transformers and each
other (relatively): `train.export` copies them beside a run's weights, where they load and
sample without this project. Each sequence model keeps its constructor's arguments in
`hparams`, so `type(model)(**model.hparams)` rebuilds it.
"""

SEQUENCE_MODULES = ("attention", "attention_types", "generation", "masks", "sequence",
                    "seq2seq")
