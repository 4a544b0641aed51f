"""The MetricInfo every shipped metric module declares: two columns of one dtype."""
import datasets
import evaluate


def pairwise_info(description: str, dtype: str) -> evaluate.MetricInfo:
    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description=f"predictions, references: lists of {dtype} values of equal length.",
        features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
    )
