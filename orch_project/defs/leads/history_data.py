"""A seeded, generated history of handled leads with a 0/1 ``Converted`` label, for developing and
testing the lead scorer (``orch_project.lib.tabular``) without real customer data.

    python -m orch_project.defs.leads.history_data --out leads.csv --n 9000 --seed 7

The table has the traits of a real lead-handling export, on purpose:

* two id columns (``Prospect ID``, a UUID string; ``Lead Number``, a unique integer);
* numeric columns with a heavy tail, many zeros and missing values (visits, time on the website, page
  views per visit), one of them stored as text;
* low- and high-cardinality categories (origin, source with case variants and rare levels, last activity,
  country, specialisation, city with a long tail), unfilled form fields recorded as ``Select``, empty
  strings or ``unknown``;
* Yes/No flags, some almost always ``No``, two always ``No`` (constant columns);
* a free-text ``Notes`` column (what the lead wrote when enquiring: mostly unique sentences);
* the columns the sales team fills in while qualifying a lead (``QUALIFICATION_COLUMNS``: tags, lead
  quality, lead profile, activity/profile index and score). They are written after contact, so they
  carry much of the outcome (they are drawn given the outcome) and are missing for leads not yet
  contacted; excluding them gives the harder, honest "score a new lead" problem.

How the label is drawn. A hidden intent ``u ~ N(0, 1)`` drives engagement (visits, time on the site) and
what the lead writes. The conversion log-odds are a non-linear mix: origin and source effects, a
saturating effect of time on the website that is stronger for working professionals, last-activity and
occupation effects (a missing occupation is informative), the do-not-email flag, a few interactions, the
part of the intent that nothing observed reveals, and noise. With the default size and seed a tuned
gradient-boosting model reaches a held-out AUC of about 0.98 with the qualification columns and about
0.90 without them; the conversion rate is about 39 %.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and pandas load inside the functions: the code location imports this module
    import numpy as np
    import pandas as pd

LABEL_COLUMN = "Converted"
ID_COLUMN = "Prospect ID"
TEXT_COLUMN = "Notes"
QUALIFICATION_COLUMNS = ("Tags", "Lead Quality", "Lead Profile", "Activity Index", "Activity Score",
                         "Profile Index", "Profile Score")

ORIGINS = {"Landing Page Submission": 0.53, "API": 0.387, "Lead Add Form": 0.077, "Lead Import": 0.0058,
           "Quick Add Form": 0.0002}
ORIGIN_EFFECT = {"Landing Page Submission": 0.0, "API": 0.1, "Lead Add Form": 2.6, "Lead Import": -0.6,
                 "Quick Add Form": 1.0}
# source shares per origin
SOURCES = {
    "Landing Page Submission": {"Direct Traffic": 0.46, "Google": 0.30, "Organic Search": 0.14,
                                "Referral Sites": 0.025, "Olark Chat": 0.005, "Facebook": 0.002,
                                "bing": 0.002, "google": 0.002, "Click2call": 0.001, "Press Release": 0.0005,
                                "Social Media": 0.0005, "Live Chat": 0.0004, "blog": 0.0003, "": 0.05},
    "API": {"Olark Chat": 0.50, "Google": 0.27, "Organic Search": 0.11, "Direct Traffic": 0.07,
            "Referral Sites": 0.025, "Pay per Click Ads": 0.002, "youtube channel": 0.002, "Facebook": 0.003,
            "testone": 0.001, "welearn blog": 0.0005, "NC_EDM": 0.0005, "": 0.015},
    "Lead Add Form": {"Reference": 0.70, "Partner Website": 0.22, "Google": 0.02, "Direct Traffic": 0.01,
                      "Social Media": 0.005, "": 0.045},
    "Lead Import": {"Facebook": 0.96, "": 0.04},
    "Quick Add Form": {"": 1.0},
}
SOURCE_EFFECT = {"Reference": 0.8, "Partner Website": 1.5, "Olark Chat": -0.35, "Organic Search": 0.05,
                 "Direct Traffic": -0.25, "Google": 0.15, "google": 0.15, "Referral Sites": -0.3,
                 "Facebook": -0.5, "Click2call": 0.8, "Live Chat": 1.0}
LAST_ACTIVITY = {"Email Opened": 0.37, "SMS Sent": 0.297, "Olark Chat Conversation": 0.105,
                 "Page Visited on Website": 0.07, "Converted to Lead": 0.046, "Email Bounced": 0.035,
                 "Email Link Clicked": 0.029, "Form Submitted on Website": 0.0126, "Unreachable": 0.01,
                 "Unsubscribed": 0.0066, "Had a Phone Conversation": 0.0033, "Approached upfront": 0.001,
                 "View in browser link Clicked": 0.0006, "Email Received": 0.0003, "Email Marked Spam": 0.0002,
                 "Visited Booth in Tradeshow": 0.0001, "Resubscribed to emails": 0.0001, None: 0.0118}
ACTIVITY_EFFECT = {"SMS Sent": 1.35, "Email Opened": 0.3, "Olark Chat Conversation": -1.3,
                   "Page Visited on Website": -0.35, "Converted to Lead": -1.1, "Email Bounced": -1.4,
                   "Email Link Clicked": -0.2, "Form Submitted on Website": -0.3, "Unreachable": 0.1,
                   "Unsubscribed": -0.3, "Had a Phone Conversation": 2.3, "Approached upfront": 3.0,
                   "Email Received": 2.0, None: 0.6}
OCCUPATIONS = {"Unemployed": 0.606, "Working Professional": 0.076, "Student": 0.0227, "Other": 0.0017,
               "Housewife": 0.001, "Businessman": 0.0009, None: 0.291}
OCCUPATION_EFFECT = {"Unemployed": 0.0, "Working Professional": 2.2, "Student": -0.1, "Other": 0.5,
                     "Housewife": 3.0, "Businessman": 0.6, None: -1.0}
SPECIALISATIONS = {"Select": 0.21, None: 0.155, "Finance Management": 0.106, "Human Resource Management": 0.092,
                   "Marketing Management": 0.091, "Operations Management": 0.054, "Business Administration": 0.044,
                   "IT Projects Management": 0.04, "Supply Chain Management": 0.038,
                   "Banking, Investment And Insurance": 0.037, "Media and Advertising": 0.022,
                   "Travel and Tourism": 0.022, "International Business": 0.019, "Healthcare Management": 0.017,
                   "Hospitality Management": 0.012, "E-COMMERCE": 0.012, "Retail Management": 0.011,
                   "Rural and Agribusiness": 0.008, "E-Business": 0.006, "Services Excellence": 0.004}
SPEC_EFFECT = {"Select": -0.5, None: -0.1, "Finance Management": 0.1, "Human Resource Management": 0.15,
               "Marketing Management": 0.2, "Operations Management": 0.1, "Banking, Investment And Insurance": 0.2,
               "Healthcare Management": 0.25, "Hospitality Management": -0.3, "Travel and Tourism": -0.3,
               "Rural and Agribusiness": 0.1}
HEARD = {"Select": 0.546, None: 0.239, "Online Search": 0.087, "Word Of Mouth": 0.038, "Student of SomeSchool": 0.034,
         "Other": 0.02, "Multiple Sources": 0.0165, "Advertisements": 0.0075, "Social Media": 0.0072,
         "Email": 0.0028, "SMS": 0.0025}
COUNTRIES = ["United States", "United Arab Emirates", "Singapore", "Saudi Arabia", "United Kingdom", "Australia",
             "Qatar", "Hong Kong", "Bahrain", "Oman", "France", "unknown", "South Africa", "Nigeria", "Germany",
             "Kuwait", "Canada", "Sweden", "China", "Asia/Pacific Region", "Uganda", "Bangladesh", "Italy",
             "Belgium", "Netherlands", "Ghana", "Philippines", "Russia", "Switzerland", "Vietnam", "Denmark",
             "Tanzania", "Liberia", "Malaysia", "Kenya", "Sri Lanka", "Indonesia"]
CITIES = ["Mumbai", "Thane & Outskirts", "Other Cities", "Pune", "Bengaluru", "Delhi", "Hyderabad", "Chennai",
          "Kolkata", "Ahmedabad", "Other Metro Cities", "Tier II Cities", "Jaipur", "Lucknow", "Surat", "Nagpur",
          "Indore", "Bhopal", "Patna", "Vadodara", "Nashik", "Coimbatore", "Kochi", "Visakhapatnam", "Ludhiana",
          "Agra", "Kanpur", "Rajkot", "Meerut", "Varanasi", "Srinagar", "Aurangabad", "Dhanbad", "Amritsar",
          "Allahabad", "Ranchi", "Howrah", "Gwalior", "Jabalpur", "Vijayawada", "Jodhpur", "Madurai", "Raipur",
          "Kota", "Guwahati", "Chandigarh", "Solapur", "Hubli", "Mysuru", "Tiruchirappalli", "Bareilly",
          "Moradabad", "Tiruppur", "Gurugram", "Aligarh", "Jalandhar", "Bhubaneswar", "Salem", "Warangal",
          "Thiruvananthapuram", "Bhiwandi", "Saharanpur", "Guntur", "Amravati", "Noida", "Jamshedpur",
          "Bhilai", "Cuttack", "Firozabad", "Dehradun"]
CITY_EFFECT = {"Mumbai": 0.05, "Thane & Outskirts": 0.1, "Pune": 0.15, "Tier II Cities": -0.3, "Other Cities": -0.05}
NOTABLE = {"Modified": 0.40, "Page Visited on Website": 0.035, "Email Link Clicked": 0.02, "Unreachable": 0.004,
           "Unsubscribed": 0.005}
INTENT_OPENERS = ["Hi", "Hello", "Good morning", "Dear team", "", "", "Hey", "Greetings"]
HIGH_INTENT = ["I want to enrol in the next batch", "please share the fee structure and EMI options",
               "is there a scholarship for working professionals", "I would like to start this month",
               "please call me back to complete admission", "what documents do I need for enrolment",
               "can I pay the fees in instalments", "I am ready to join, please guide me",
               "is the weekend batch still open"]
MID_INTENT = ["what is the duration of the programme", "do you offer placement support",
              "is the certificate recognised", "what are the class timings", "can I talk to a counsellor",
              "how are the exams conducted", "is there a live session option"]
LOW_INTENT = ["just browsing for now", "only want some information", "maybe next year",
              "comparing a few options", "send me the brochure, no calls please", "not sure yet",
              "I am already enrolled elsewhere", "looking for free courses"]
SUBJECTS = ["finance", "marketing", "HR", "operations", "data analytics", "supply chain", "business", "IT",
            "healthcare", "banking", "retail", "media"]
# Sales-team tags: (share, conversion rate) as seen after contact; drawn given the outcome.
TAGS = {"Will revert after reading the email": (0.224, 0.96), "Ringing": (0.13, 0.03),
        "Interested in other courses": (0.055, 0.03), "Already a student": (0.05, 0.01),
        "Closed by partner": (0.039, 0.99), "switched off": (0.026, 0.02), "Busy": (0.02, 0.55),
        "Lost to competitor": (0.019, 0.97), "Not doing further education": (0.016, 0.01),
        "Interested in full time course": (0.013, 0.03), "Graduation in progress": (0.012, 0.09),
        "invalid number": (0.009, 0.02), "Diploma holder (Not Eligible)": (0.007, 0.01),
        "wrong number given": (0.005, 0.02), "opp hangup": (0.0036, 0.09), "number not provided": (0.0029, 0.0),
        "in touch with competitor": (0.0013, 0.25), "Lost to Others": (0.0007, 0.9), "Still Thinking": (0.0006, 0.2),
        "Want to take admission but has financial problems": (0.0006, 0.3),
        "In confusion whether part time or distance": (0.0005, 0.1), "Interested in Next batch": (0.0005, 1.0),
        "Lateral student": (0.0003, 1.0), "Shall take in the next coming month": (0.0002, 0.5),
        "University not recognized": (0.0002, 0.0), "Recognition issue": (0.0001, 0.0)}
QUALITY = {"Might be": (0.17, 0.76), "Not Sure": (0.12, 0.24), "High in Relevance": (0.07, 0.95),
           "Worst": (0.065, 0.02), "Low in Relevance": (0.06, 0.82)}
PROFILE = {"Potential Lead": (0.175, 0.79), "Other Leads": (0.053, 0.36), "Student of SomeSchool": (0.026, 0.04),
           "Lateral Student": (0.0025, 0.95), "Dual Specialization Student": (0.0022, 0.99)}


def _pick(rng: np.random.Generator, table: dict, size: int) -> np.ndarray:
    import numpy as np
    keys = list(table)
    p = np.array([table[k] for k in keys], dtype=float)
    idx = rng.choice(len(keys), size=size, p=p / p.sum())
    return np.array(keys, dtype=object)[idx]


def _pick_given(rng: np.random.Generator, table: dict, y: np.ndarray) -> np.ndarray:
    """Draw a sales-team value given the outcome: P(level | y) from each level's share and conversion rate."""
    import numpy as np
    out = np.empty(len(y), dtype=object)
    keys = list(table)
    for label in (0, 1):
        rows = np.flatnonzero(y == label)
        w = np.array([s * (c if label else 1 - c) for s, c in table.values()], dtype=float)
        out[rows] = np.array(keys, dtype=object)[rng.choice(len(keys), size=len(rows), p=w / w.sum())]
    return out


def _note(rng: np.random.Generator, intent: float) -> str | None:
    if rng.random() < 0.3:
        return None
    pool = HIGH_INTENT if intent + rng.normal(0, 0.9) > 0.8 else (
        LOW_INTENT if intent + rng.normal(0, 0.9) < -0.7 else MID_INTENT)
    parts = [rng.choice(INTENT_OPENERS)]
    parts.append(f"I am interested in the {rng.choice(SUBJECTS)} course")
    parts.append(str(rng.choice(pool)))
    if rng.random() < 0.5:
        parts.append(str(rng.choice(MID_INTENT)))
    if rng.random() < 0.4:
        parts.append(f"reach me after {rng.integers(9, 20)}:00")
    if rng.random() < 0.3:
        parts.append(f"ref {rng.integers(1000, 99999)}")
    text = ", ".join(p for p in parts if p)
    return text[0].upper() + text[1:] + "."


def generate_history(n: int = 9000, seed: int = 7) -> pd.DataFrame:
    """``n`` generated leads with their outcome (``Converted`` 0/1), deterministic for a seed."""
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(seed)
    u = rng.normal(0, 1, n)  # hidden intent
    origin = _pick(rng, ORIGINS, n)
    source = np.empty(n, dtype=object)
    for o, table in SOURCES.items():
        rows = np.flatnonzero(origin == o)
        source[rows] = _pick(rng, table, len(rows))
    source[(source == "") & (rng.random(n) < 0.9)] = None

    # engagement: forms and chat leads often never browse the site
    no_browse = np.isin(origin, ["Lead Add Form", "Lead Import", "Quick Add Form"]) | (
        (source == "Olark Chat") & (rng.random(n) < 0.8)) | (rng.random(n) < 0.05)
    visits = np.where(no_browse, 0, np.maximum(1, rng.negative_binomial(2, 2 / (2 + 3.2 * np.exp(0.25 * u)), n)))
    visits = np.where(rng.random(n) < 0.003, rng.integers(30, 250, n), visits).astype(float)
    time_on_site = np.where(visits > 0, np.exp(rng.normal(5.6 + 0.45 * u, 0.9, n)) * np.minimum(visits, 6) ** 0.3, 0)
    time_on_site = np.minimum(np.round(time_on_site), 2300).astype(float)
    ppv = np.where(visits > 0, np.round(np.minimum(visits, np.exp(rng.normal(0.8, 0.45, n))), 2), 0.0)
    missing_visits = rng.random(n) < 0.015
    visits[missing_visits] = np.nan
    ppv[missing_visits] = np.nan

    activity = _pick(rng, LAST_ACTIVITY, n)
    # intent nudges the last activity towards an SMS reply or a call
    eager = (u + rng.normal(0, 1, n) > 1.6) & (rng.random(n) < 0.5)
    activity[eager] = "SMS Sent"
    activity[(source == "Olark Chat") & (rng.random(n) < 0.45)] = "Olark Chat Conversation"
    occupation = _pick(rng, OCCUPATIONS, n)
    occupation[(origin == "API") & (rng.random(n) < 0.25)] = None
    speciality = _pick(rng, SPECIALISATIONS, n)
    speciality[(origin == "Lead Add Form") & (rng.random(n) < 0.5)] = None
    heard = _pick(rng, HEARD, n)
    country = np.where(rng.random(n) < 0.70, "India", None).astype(object)
    abroad = (country == None) & (rng.random(n) < 0.12)  # noqa: E711
    zipf = 1 / np.arange(1, len(COUNTRIES) + 1) ** 1.3
    country[abroad] = np.array(COUNTRIES, dtype=object)[rng.choice(len(COUNTRIES), abroad.sum(), p=zipf / zipf.sum())]
    city = np.array(CITIES, dtype=object)[rng.choice(len(CITIES), n, p=(w := 1 / np.arange(1, len(CITIES) + 1)) / w.sum())]
    city[rng.random(n) < 0.24] = "Select"
    city[rng.random(n) < 0.15] = None
    do_not_email = np.where(rng.random(n) < 0.079, "Yes", "No").astype(object)
    do_not_call = np.where(rng.random(n) < 0.0003, "Yes", "No").astype(object)
    free_copy = np.where(rng.random(n) < 0.31 + 0.2 * (origin == "Landing Page Submission"), "Yes", "No").astype(object)

    # conversion log-odds
    f = lambda table, col, default=0.0: np.array([table.get(v, default) for v in col])  # noqa: E731
    t = time_on_site / 1000.0
    occ_wp = (occupation == "Working Professional")
    z = (-1.6 + f(ORIGIN_EFFECT, origin) + f(SOURCE_EFFECT, source) + f(ACTIVITY_EFFECT, activity)
         + f(OCCUPATION_EFFECT, occupation) + f(SPEC_EFFECT, speciality, 0.0) + f(CITY_EFFECT, city)
         + 2.6 * np.tanh(1.6 * t) - 0.9 * (t > 1.6) + 1.0 * occ_wp * np.tanh(2 * t)
         + 0.6 * ((activity == "SMS Sent") & (t > 0.4)) - 0.8 * ((visits == 0) & (origin == "API"))
         - 0.15 * np.nan_to_num(np.minimum(visits, 12) - 3, nan=0) * (t < 0.1)
         - 1.0 * (do_not_email == "Yes") - 0.3 * (free_copy == "Yes") - 0.5 * (heard == "Student of SomeSchool")
         + 0.35 * u + rng.normal(0, 0.3, n))
    y = (rng.random(n) < 1 / (1 + np.exp(-1.35 * z))).astype(int)

    notable = np.where(rng.random(n) < 0.40, "Modified", activity).astype(object)
    notable[notable == None] = "Modified"  # noqa: E711
    rare = rng.random(n) < 0.06
    notable[rare] = _pick(rng, NOTABLE, int(rare.sum()))
    notes = [_note(rng, ui) for ui in u]

    # qualification: filled in after contact; drawn given the outcome
    contacted = rng.random(n) < np.where(y == 1, 0.74, 0.60)
    tags = _pick_given(rng, TAGS, y)
    tags[~contacted] = None
    quality = _pick_given(rng, QUALITY, y)
    quality[(~contacted) | (rng.random(n) < 0.28)] = None
    profile = _pick_given(rng, PROFILE, y)
    select_profile = rng.random(n) < np.where(contacted, 0.55, 0.45)
    profile[select_profile] = "Select"
    profile[(~contacted & ~select_profile) | (rng.random(n) < 0.1)] = None
    scored = rng.random(n) < 0.54
    act_score = np.clip(np.round(14 + 1.3 * u + 0.6 * y + rng.normal(0, 1.0, n)), 7, 18)
    prof_score = np.clip(np.round(16 + 0.8 * y + rng.normal(0, 1.6, n)), 11, 20)
    act_index = np.where(act_score >= 16, "01.High", np.where(act_score >= 13, "02.Medium", "03.Low")).astype(object)
    prof_index = np.where(prof_score >= 18, "01.High", np.where(prof_score >= 14, "02.Medium", "03.Low")).astype(object)
    act_score = np.where(scored, act_score, np.nan)
    prof_score = np.where(scored, prof_score, np.nan)
    act_index[~scored] = None
    prof_index[~scored] = None

    def yes_no(rate: float) -> np.ndarray:
        return np.where(rng.random(n) < rate, "Yes", "No").astype(object)

    lead_number = 579000 + rng.choice(90000, n, replace=False)
    ids = [str(uuid.UUID(int=int(rng.integers(0, 2**62)) << 64 | int(rng.integers(0, 2**62)), version=4))
           for _ in range(n)]
    visits_text = np.array(["" if np.isnan(v) else str(int(v)) for v in visits], dtype=object)  # numbers as text
    df = pd.DataFrame({
        "Prospect ID": ids,
        "Lead Number": lead_number,
        "Lead Origin": origin,
        "Lead Source": source,
        "Do Not Email": do_not_email,
        "Do Not Call": do_not_call,
        "Converted": y,
        "TotalVisits": visits_text,
        "Total Time Spent on Website": time_on_site.astype(int),
        "Page Views Per Visit": ppv,
        "Last Activity": activity,
        "Country": country,
        "Specialization": speciality,
        "How did you hear about us": heard,
        "Current Occupation": occupation,
        "What matters most in choosing a course": np.where(occupation == None, None,  # noqa: E711
                                                           _pick(rng, {"Better Career Prospects": 0.9995,
                                                                       "Flexibility & Convenience": 0.0003,
                                                                       "Other": 0.0002}, n)),
        "Search": yes_no(0.0015),
        "Magazine": yes_no(0.0),
        "Newspaper Article": yes_no(0.0002),
        "Forums": yes_no(0.0001),
        "Newspaper": yes_no(0.0001),
        "Digital Advertisement": yes_no(0.0004),
        "Through Recommendations": yes_no(0.0008),
        "Receive More Updates About Our Courses": yes_no(0.0),
        "Tags": tags,
        "Lead Quality": quality,
        "Lead Profile": profile,
        "City": city,
        "Activity Index": act_index,
        "Profile Index": prof_index,
        "Activity Score": act_score,
        "Profile Score": prof_score,
        "A free copy of the interview guide": free_copy,
        "Last Notable Activity": notable,
        "Notes": notes,
    })
    return df


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write a generated, labelled lead history as CSV.")
    ap.add_argument("--out", type=Path, required=True, help="CSV file to write")
    ap.add_argument("--n", type=int, default=9000, help="number of leads (default 9000)")
    ap.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    args = ap.parse_args(argv)
    df = generate_history(args.n, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(f"{len(df)} leads, {df[LABEL_COLUMN].mean():.1%} converted -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
