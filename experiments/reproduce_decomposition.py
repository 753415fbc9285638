"""Test the DoRA paper's weight-decomposition finding (section 3, Figure 2) at small scale, against a null.

The paper plots ΔM (mean |change of row norm|) against ΔD (mean 1 − cos to the pre-trained row) for the query
matrices of several layers at several checkpoints and reports one correlation per method: full fine-tuning
−0.62, LoRA +0.83, DoRA −0.31. Pooling checkpoints builds in a positive correlation (every layer's ΔM and ΔD
grow over training), so this script reports, per method, the pooled r *and* correlations across layers within
each snapshot (Pearson, step-centred partial, Spearman) with 95 % bootstrap intervals over layers, compares
each with random updates of the same size (:mod:`torchdora.analysis.null`) and gives a verdict.

Runs (all on the embedded SmolLM2-135M-Instruct and Rotten Tomatoes, snapshots spread over the run, every
method with each seed), in two plans (``--plan``; any option overrides the plan's value):

- ``pilot``: 0.2 epoch at a constant learning rate after 5 warm-up steps, 2 seeds (the first rerun);
- ``plateau``: the positive control's length, one epoch of 2,000 examples at batch 8 (250 steps), linear decay
  to 0 after 10 warm-up steps, a snapshot every 25 steps, 3 seeds.

Methods: ``full`` (full fine-tuning, lr 1e-4), ``full-qv`` (full fine-tuning of the q_proj and v_proj weights
only, ``--train-only``), ``lora``/``dora`` (q_proj and v_proj adapters, r 8, alpha 16, lr 1e-3). The one-change
ablations (``--dropout``, ``--magnitude-lr-ratio``, ``--weight-decay``, ``--magnitude-weight-decay``) apply to the
adapter runs, which then get their own folders (``dora-seed0-mlr0.1``) and result set (``plateau-mlr0.1``).

    python experiments/reproduce_decomposition.py --plan plateau --methods full --seeds 0   # the control
    python experiments/reproduce_decomposition.py --plan plateau --methods lora dora        # then 3 seeds each
    python experiments/reproduce_decomposition.py --plan plateau --analyze-only             # measure what is there
    python experiments/reproduce_decomposition.py --plan plateau --seeds 0 --adapter-steps 8 --adapter-save-every 2 \\
        --full-steps 4 --full-save-every 1 --max-train 32 --max-eval 16 --output-dir /tmp/decomp-smoke \\
        --docs /tmp/decomp-smoke/results.md --figures-dir /tmp/decomp-smoke/fig --data-dir /tmp/decomp-smoke/data

A finished run (``summary.json`` present and its ``config.json`` agreeing with these settings) is reused; an
unfinished one with a checkpoint of these settings is resumed (``torchdora train --resume``); any other run folder
is deleted and trained again. Full fine-tuning snapshots are whole models (~540 MB each). Measuring writes the
result set's CSVs (``<data-dir>/<set>/``), then ``experiments/decomposition_page.py`` writes the page from the CSVs.
