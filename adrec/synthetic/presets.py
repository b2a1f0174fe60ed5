"""Sizes of the synthetic data sets, from a seconds-long test set up to the real data's size."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

# Rows of the real behavior_log.csv; every preset generates fewer and says so in its manifest.
REAL_BEHAVIOR_ROWS = 723_268_134


@dataclass(frozen=True)
class Preset:
    name: str
    users: int  # distinct users in raw_sample
    users_without_profile: int  # of those, users missing from user_profile
    profile_users: int  # rows of user_profile, including a few users never shown an ad
    ads: int  # rows of ad_feature; every ad is shown at least once
    ad_categories: int
    behavior_categories: int  # categories browsed in behavior_log, a superset of ad categories
    campaigns: int
    customers: int
    brands: int  # brands seen in behavior_log; ads use the most popular ones
    samples: int  # rows of raw_sample
    behavior_rows: int

    @property
    def profile_only_users(self) -> int:
        return self.profile_users - (self.users - self.users_without_profile)

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def validate(self) -> None:
        """Reject sizes the generator cannot honour exactly."""
        problems = []
        if self.profile_only_users < 0:
            problems.append("profile_users is smaller than the users with a profile")
        if self.samples < self.users + self.ads:
            problems.append("samples must cover one impression per user and per ad")
        if not self.ad_categories <= self.behavior_categories <= self.brands:
            problems.append("need ad_categories <= behavior_categories <= brands")
        if not self.customers <= self.campaigns <= self.ads:
            problems.append("need customers <= campaigns <= ads")
        if self.ads < self.ad_categories:
            problems.append("every ad category needs at least one ad")
        if problems:
            raise ValueError(f"preset {self.name!r}: " + "; ".join(problems))


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="tiny",
            users=2_000,
            users_without_profile=140,
            profile_users=1_862,
            # Enough ads that a 500-ad recall list is a real choice among top categories.
            ads=3_000,
            ad_categories=50,
            behavior_categories=100,
            campaigns=250,
            customers=150,
            brands=600,
            samples=40_000,
            behavior_rows=100_000,
        ),
        Preset(
            name="small",
            users=20_000,
            users_without_profile=1_400,
            profile_users=18_610,
            ads=15_000,
            ad_categories=400,
            behavior_categories=800,
            campaigns=8_000,
            customers=5_000,
            brands=12_000,
            samples=450_000,
            behavior_rows=2_000_000,
        ),
        Preset(
            name="medium",
            users=200_000,
            users_without_profile=14_000,
            profile_users=186_100,
            ads=100_000,
            ad_categories=3_000,
            behavior_categories=6_000,
            campaigns=50_000,
            customers=30_000,
            brands=80_000,
            samples=3_000_000,
            # 200 rows per user: enough to rank a user's categories (the real log has ~630).
            behavior_rows=40_000_000,
        ),
        # The real data's counts; only the behavior log is scaled down.
        Preset(
            name="full",
            users=1_141_729,
            users_without_profile=80_000,
            profile_users=1_061_768,
            ads=846_811,
            ad_categories=6_769,
            behavior_categories=12_968,
            campaigns=423_436,
            customers=255_875,
            brands=460_561,
            samples=26_557_961,
            behavior_rows=100_000_000,
        ),
    )
}

# Every count of the real data, the behaviour log's 723M rows included.
PRESETS["real"] = replace(PRESETS["full"], name="real", behavior_rows=REAL_BEHAVIOR_ROWS)
