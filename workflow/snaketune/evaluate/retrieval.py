"""The Q&A baseline: answer each test question with the answer of the most similar training
question, by bag-of-words cosine (lower-cased words, counts, L2-normalized), scored like the
model's answers. Ties go to the earlier training example; a question sharing no word with any
training question gets the first training answer. At most MAX_TRAIN_EXAMPLES training examples
(the first ones) are indexed, so the baseline's memory is bounded whatever the corpus."""

from __future__ import annotations

import numpy as np

MAX_TRAIN_EXAMPLES = 200_000
QUERY_BATCH = 1024  # test questions scored against the index at a time


def nearest_answers(
    train_prompts: list[str], train_responses: list[str], test_prompts: list[str]
) -> list[str]:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.preprocessing import normalize

    train_prompts = train_prompts[:MAX_TRAIN_EXAMPLES]
    vectorizer = CountVectorizer(token_pattern=r"(?u)\b\w+\b")
    index = normalize(vectorizer.fit_transform(train_prompts)).T.tocsr()
    queries = normalize(vectorizer.transform(test_prompts))
    best: list[int] = []
    for start in range(0, queries.shape[0], QUERY_BATCH):
        similarity = (queries[start : start + QUERY_BATCH] @ index).toarray()
        best.extend(np.argmax(similarity, axis=1).tolist())
    return [train_responses[i] for i in best]
