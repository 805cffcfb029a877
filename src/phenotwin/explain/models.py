"""Interpretable models of the condition from per-cell features, measured against a black box.

After Soelistyo & Lowe (2024): a sparse model and a symbolic formula on a handful of readable
variables can reach nearly a black box's accuracy, and can be read as an explanation.

- **sparse**: L1 logistic regression on standardised features; the penalty is lowered along its
  path until just before more than k features enter, then those features are refitted without
  the L1 shrinkage (a relaxed lasso), so the coefficients are not biased towards 0;
- **formula**: gplearn's SymbolicClassifier (genetic programming, pure Python on scikit-learn,
  maintained, installs from the package registry with no second language runtime as PySR's Julia
  would need) on the sparse model's features, a one-line formula whose sign is the condition;
- **black box**: scikit-learn's RandomForestClassifier (300 trees) on all features;
- **image black box** (`cnn_black_box`): the CNN `phenotwin evaluate` trains, on the cells' crops;
- **β-VAE factors** (`latent_model`): the sparse model again, on the latent means of the β-VAE
  of the crops (`explain.vae`).

Every model is fitted on the same training cells and scored on the same held-out cells (one
stratified split, `split`); accuracies are also given relative to both black boxes (`relate`).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from phenotwin.errors import PhenotwinError
from phenotwin.explain.features import Feature

MIN_CELLS_PER_CONDITION = 10
TEST_FRACTION = 0.3
FOREST, CNN = "forest", "cnn"  # the two black boxes' kinds


@dataclass
class ConditionModel:
    name: str
    accuracy: float  # held-out
    n_features: int
    features: list[str] = field(default_factory=list)  # keys, most important first
    formula: str = ""  # readable: "nocodazole when 2.1 × golgi fragments + ... > 0"
    terms: int = 0  # formula size: nonzero coefficients, or gplearn program length
    relative_to_black_box: float = float("nan")  # of the random forest on the features
    relative_to_cnn: float = float("nan")  # of the CNN on the cell crops
    kind: str = ""  # FOREST, CNN, or what the model is: "sparse", "formula", "vae"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _matrix(rows: list[dict[str, Any]], features: list[Feature]) -> np.ndarray:
    return np.array([[float(row.get(f.key, np.nan)) for f in features] for row in rows], dtype=np.float64).reshape(
        len(rows), len(features))


def _prepared(rows_a, rows_b, features, conditions):
    for rows, condition in zip((rows_a, rows_b), conditions):
        if len(rows) < MIN_CELLS_PER_CONDITION:
            raise PhenotwinError(f"{condition} has {len(rows)} cell(s); a model of the condition needs at least "
                                 f"{MIN_CELLS_PER_CONDITION} cells of each condition (give more images).")
    X = np.vstack([_matrix(rows_a, features), _matrix(rows_b, features)])
    y = np.r_[np.zeros(len(rows_a), int), np.ones(len(rows_b), int)]
    # features that vary between cells and are measured in most of them: a constant column says nothing
    usable = [j for j in range(X.shape[1]) if np.isfinite(X[:, j]).mean() > 0.9 and np.nanstd(X[:, j]) > 0]
    return X[:, usable], y, [features[j] for j in usable]


def fit_models(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], features: list[Feature],
               conditions: tuple[str, str], k: int = 5, seed: int = 0, formula: bool = True,
               population: int = 1000, generations: int = 15) -> list[ConditionModel]:
    """Black box, sparse model and (with `formula`) symbolic formula; held-out accuracy of each.
    `population` and `generations` size the formula's search (its run time grows with their product)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if k < 1:
        raise PhenotwinError(f"k (how many features the sparse model may use) must be 1 or more, got {k}.")
    X, y, usable = _prepared(rows_a, rows_b, features, conditions)
    if not usable:
        raise PhenotwinError("no feature varies between the cells; nothing can tell the conditions apart.")
    train, test = split(y, seed)
    X_train, X_test, y_train, y_test = X[train], X[test], y[train], y[test]
    # a random forest, not gradient boosting: boosting's default leaves of 20 cells learn nothing from a few dozen
    black_box = make_pipeline(SimpleImputer(strategy="median"),
                              RandomForestClassifier(n_estimators=300, random_state=seed, n_jobs=1)).fit(X_train, y_train)
    reference = float(black_box.score(X_test, y_test))
    models = [ConditionModel("black box (random forest, all features)", reference, len(usable),
                             [f.key for f in usable], terms=len(usable), kind=FOREST)]
    scale = make_pipeline(SimpleImputer(strategy="median"), StandardScaler()).fit(X_train)
    Z_train, Z_test = scale.transform(X_train), scale.transform(X_test)
    chosen, sparse = _sparse(Z_train, y_train, Z_test, y_test, usable, conditions, k, seed)
    models.append(sparse)
    if formula:
        models.append(_formula(Z_train[:, chosen], y_train, Z_test[:, chosen], y_test,
                               [usable[j] for j in chosen], conditions, seed, population, generations))
    return relate(models)


def split(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out cell indices (stratified, seeded): the one split every model of a run uses."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(np.arange(len(y)), test_size=TEST_FRACTION, stratify=y, random_state=seed)
    return train, test


def relate(models: list[ConditionModel]) -> list[ConditionModel]:
    """Each model's accuracy as a share of each black box's (NaN where that black box was not trained).

    Two black boxes, because they answer two questions: the random forest sees the same features
    as the sparse model and the formula, so its ratio says how much of what the features can tell
    a few of them tell; the CNN (the classifier of `phenotwin evaluate`, the issue's reference)
    sees the pixels, so its ratio says how much of what the images can tell at all the readable
    models capture, and it is the fair reference for the β-VAE factors, which see pixels too."""
    references = {kind: next((m.accuracy for m in models if m.kind == kind), float("nan")) for kind in (FOREST, CNN)}
    for model in models:
        model.relative_to_black_box, model.relative_to_cnn = (
            model.accuracy / reference if reference > 0 else float("nan")
            for reference in (references[FOREST], references[CNN]))
    return models


def cnn_black_box(crops: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                  conditions: tuple[str, str], seed: int = 0, epochs: int | None = None) -> ConditionModel:
    """`phenotwin evaluate`'s CNN (its recipe, `evaluate.classifier`) trained on the training cells' crops
    ((N, C, S, S) in [0, 1]) and scored on the held-out cells' crops."""
    from phenotwin.evaluate.classifier import CLASSIFIER_EPOCHS, train_classifier

    images = 2.0 * np.asarray(crops, np.float32) - 1.0  # the model range [-1, 1] the classifier trains on
    classifier = train_classifier(images[train], np.asarray(y)[train], list(conditions),
                                  epochs=CLASSIFIER_EPOCHS if epochs is None else epochs, seed=seed, held_out=0.0)
    accuracy = float((classifier.predict(images[test]) == np.asarray(y)[test]).mean())
    parameters = sum(p.numel() for p in classifier.network.parameters())
    return ConditionModel(f"black box (CNN of phenotwin evaluate, {crops.shape[-1]} px cell crops)", accuracy,
                          int(np.prod(crops.shape[1:])), terms=int(parameters), kind=CNN)


def latent_model(latents: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                 conditions: tuple[str, str], k: int = 5, seed: int = 0,
                 factors: np.ndarray | None = None) -> ConditionModel:
    """The sparse model (`_sparse`, the same relaxed lasso as on the features) on the β-VAE's latent means
    of the `factors` (indices; `VAESummary.active()`: those the decoder uses; default all)."""
    from sklearn.preprocessing import StandardScaler

    factors = np.arange(latents.shape[1]) if factors is None else np.asarray(factors)
    named = [Feature(f"vae_z{j + 1}", f"β-VAE factor z{j + 1}", "sd") for j in factors]
    scale = StandardScaler().fit(latents[train][:, factors])
    y = np.asarray(y)
    _, model = _sparse(scale.transform(latents[train][:, factors]), y[train],
                       scale.transform(latents[test][:, factors]), y[test], named, conditions, k, seed,
                       name=f"sparse logistic regression on β-VAE factors (L1, k ≤ {k})")
    model.kind = "vae"
    return model


def _sparse(Z_train, y_train, Z_test, y_test, usable, conditions, k, seed, name: str = ""):
    """Walk the L1 path from strong to weak penalty; keep the last support of at most k features."""
    from sklearn.linear_model import LogisticRegression

    chosen: list[int] = []
    for C in np.logspace(-3, 2, 40):
        model = LogisticRegression(**_l1_penalty(), C=C, solver="liblinear", random_state=seed).fit(Z_train, y_train)
        support = np.flatnonzero(model.coef_[0])
        if len(support) > k:
            break
        if len(support):
            chosen = sorted(support, key=lambda j: -abs(model.coef_[0][j]))
    if not chosen:  # even the weakest penalty tried keeps no feature: take the best single one
        chosen = [int(np.argmax(np.abs(np.corrcoef(Z_train.T, y_train)[-1, :-1])))]
    refit = LogisticRegression(C=1e4, max_iter=2000).fit(Z_train[:, chosen], y_train)
    accuracy = float(refit.score(Z_test[:, chosen], y_test))  # before the reordering below
    weights = refit.coef_[0]
    order = np.argsort(-np.abs(weights))
    chosen, weights = [chosen[i] for i in order], weights[order]
    terms = " ".join(f"{'+' if w >= 0 else '-'} {abs(w):.2g} × z({usable[j].words})" for j, w in zip(chosen, weights))
    formula = f"{conditions[1]} when {terms.lstrip('+ ')} {'+' if refit.intercept_[0] >= 0 else '-'} " \
              f"{abs(refit.intercept_[0]):.2g} > 0"
    model = ConditionModel(name or f"sparse logistic regression (L1, k ≤ {k})", accuracy,
                           len(chosen), [usable[j].key for j in chosen], formula, len(chosen) + 1, kind="sparse")
    return chosen, model


def _l1_penalty() -> dict[str, Any]:
    """scikit-learn 1.8 deprecated `penalty` for `l1_ratio`; before 1.8 liblinear ignores `l1_ratio`."""
    import sklearn

    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


def _formula(Z_train, y_train, Z_test, y_test, chosen: list[Feature], conditions, seed, population,
             generations) -> ConditionModel:
    from gplearn.genetic import SymbolicClassifier

    names = [f"x{i}" for i in range(len(chosen))]
    model = SymbolicClassifier(population_size=population, generations=generations, tournament_size=20,
                               function_set=("add", "sub", "mul", "div"), parsimony_coefficient=0.005,
                               feature_names=names, random_state=seed, n_jobs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gplearn's own FutureWarnings from scikit-learn, nothing the user can fix
        model.fit(Z_train, y_train)
    program = model._program
    used = sorted({names[node] for node in program.program if isinstance(node, int)})
    key = "; ".join(f"{name} = z({chosen[int(name[1:])].words})" for name in used)
    readable = f"{conditions[1]} when {_simplified(_infix(program.program, names))} > 0   ({key})"
    return ConditionModel("symbolic formula (gplearn)", float(model.score(Z_test, y_test)), len(used),
                          [chosen[int(name[1:])].key for name in used], readable, len(program.program),
                          kind="formula")


def _simplified(formula: str) -> str:
    """gplearn's program as sympy simplifies it (evolved programs repeat themselves), 3 significant digits.
    sympy comes with torch; without it the program is shown as evolved."""
    try:
        import sympy
    except ImportError:
        return formula
    try:
        expression = sympy.simplify(sympy.sympify(formula.replace("×", "*")))
    except (sympy.SympifyError, TypeError, ValueError):
        return formula
    return str(expression.evalf(3)).replace("*", " × ")


def _infix(program: list, names: list[str]) -> str:
    """gplearn's prefix program (functions, feature indices, constants) as ordinary infix algebra."""
    symbols = {"add": "+", "sub": "-", "mul": "×", "div": "/"}

    def walk(position: int) -> tuple[str, int]:
        node = program[position]
        if isinstance(node, int):
            return names[node], position + 1
        if isinstance(node, float):
            return f"{node:.3g}", position + 1
        operands, position = [], position + 1
        for _ in range(node.arity):
            text, position = walk(position)
            operands.append(text)
        if node.name in symbols and node.arity == 2:
            return f"({operands[0]} {symbols[node.name]} {operands[1]})", position
        return f"{node.name}({', '.join(operands)})", position

    text, _ = walk(0)
    top = program[0]
    bracketed = not isinstance(top, (int, float)) and top.name in symbols and top.arity == 2
    return text[1:-1] if bracketed else text  # the outer brackets of the whole formula
