"""Training Mistral and Mixtral models from scratch or from a checkpoint, in one process or (the same loop)
on the ranks of a pipeline (``sirocco.distributed.pipeline_train``).

The data path, one module each::

    corpus.py    documents: the default corpus (the Python documentation that ships with Python) or your own
    tokenizer.py a sentencepiece BPE tokenizer with Mistral's special ids (the train-tokenizer verb)
    data.py      documents -> token rows packed without padding -> batches, with a resumable position
    losses.py    next-token cross-entropy normalised per step, Mixtral's load-balancing loss
    schedule.py  AdamW, linear warm-up then cosine decay
    loop.py      the step (a step function: micro-batches, autocast; then clipping, optimizer), validation
    state.py     checkpoints that resume exactly (model in safetensors, optimizer, data position)
    recipe.py    a run described by a TOML file and flags; plot.py the loss curve
    run.py       a whole run (corpus, tokenizer, model, steps, checkpoints, summary) in a place: this process
                 or a pipeline rank; the train verb runs it
"""
