"""Synthetic data in the Taobao data set's published format, with a planted, known truth.

:func:`generate` writes ``raw_sample.csv``, ``ad_feature.csv``, ``user_profile.csv`` and
``behavior_log.csv`` in the published format (headers, quirks and value domains of the real
files), a side file with every impression's true click probability, and ``manifest.json``.

The planted truth:

* preferences are low-rank and non-negative: each user mixes ``LATENT_RANK`` interest topics,
  each topic is a sparse, popularity-weighted distribution over categories, so a user's
  preference for a category is the dot product of a user vector and a category vector. Each
  behavior row draws a topic from the user's mix, then a category from the topic.
  A user's *interest* in a category is their expected number of behavior rows there (their
  activity times their preference): exactly what per-(user, category) ratings over the
  behavior log estimate, so collaborative filtering recovers it. Cart, fav and buy are more
  likely than pv where the user prefers the category more than the average user does.
* categories have Zipf-like popularity and sizes; within a category ads and brands have
  Zipf-like popularity.
* impressions lean toward the user's preferred categories (a mix of preference draws and
  popularity draws) and every ad is shown at least once.
* clicks follow a logistic model of interest, ad and category quality, pid, demographics and
  price sensitivity by pvalue_level; the intercept is calibrated to the target mean CTR.

Everything is vectorized over blocks of users with a fixed size; each block draws from its own
random stream derived from the seed, so the output depends on the preset and seed only (not on
the number of worker threads) and the same inputs give byte-identical files.

Modules: ``presets`` (sizes), ``truth`` (the planted parameters and time windows),
``sampling`` (random streams and vectorized draws), ``world`` (entities and per-user counts),
``model`` (behaviour and click model, calibration), ``tables`` (ad_feature, user_profile),
``blocks`` (raw_sample, truth side file, behavior_log), ``files`` (CSV encoding, atomic
files), ``manifest``, ``progress`` and ``generator`` (:func:`generate`).
"""

from adrec.synthetic.generator import GenerationResult, generate

__all__ = ["GenerationResult", "generate"]
