"""Presidio recognisers for the PII detector in ``pii.py``.

Everything here runs without an NLP model and without the network:

- Presidio's own pattern recognisers, subclassed where their defaults do not fit offline customer
  traffic: e-mail validation without ``tldextract`` (which downloads the Public Suffix List on first
  use and rejects reserved domains such as ``.example``), IBANs checked with python-stdnum (ISO 7064
  and the per-country format, any letter case), and SSNs that also count Presidio's "published
  sample" numbers (masking them costs nothing).
- ``FastPhoneRecognizer``: Presidio's ``PhoneRecognizer`` (python-phonenumbers) run only on
  phone-shaped candidates, not once per region over the whole text.
- ``SelfIntroductionRecognizer`` (PERSON): "my name is ...", "Name: ...", sign-off signatures.
- ``KnownNameRecognizer`` (PERSON): the names a message itself tells us (the sender), built per sender
  and passed to the analyzer as an ad-hoc recogniser.
- ``StreetAddressRecognizer`` (LOCATION): English, German, French, Spanish and Italian street
  address forms, with an optional ", city, postcode" tail.

The ``regex`` module (a Presidio dependency) is used for ``\\p{Lu}``-style Unicode classes.
"""

from __future__ import annotations

import re

import phonenumbers
import regex
from presidio_analyzer import EntityRecognizer, Pattern, PatternRecognizer, RecognizerResult
from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer
from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, EmailRecognizer, IbanRecognizer,
                                                      IpRecognizer, PhoneRecognizer, UsSsnRecognizer)
from stdnum import iban as _iban

# --- Presidio's predefined recognisers, adjusted ---------------------------------------


class _Gated:
    """Skips a pattern recogniser when a cheap ``re`` pre-check shows none of its patterns can match
    (most customer messages hold no card number, IBAN or IP address). ``GATE`` must match wherever
    any of the recogniser's patterns does."""

    GATE: re.Pattern

    def analyze(self, text, entities, nlp_artifacts=None, regex_flags=None):
        if not self.GATE.search(text):
            return []
        return super().analyze(text, entities, nlp_artifacts, regex_flags)


class LuhnCardRecognizer(_Gated, CreditCardRecognizer):
    """Presidio's card recogniser (13 to 17 digits in groups, Luhn checksum), gated, plus the groupings it
    misses: 13 to 19 digits (Maestro, UnionPay) in groups of 2 to 6 separated by up to two spaces, dashes,
    dots or underscores, and a number glued to the word after it ("...1111exp 12/27"). Every candidate
    must pass the Luhn checksum; the new pattern also needs a card's first digit (2 to 6)."""

    GATE = re.compile(r"\d(?:[ ._-]{0,2}\d){12}")
    # not the account part of an IBAN-looking string ("DE89 3704 ..." whose check digits fail)
    _ANY_GROUPING = Pattern("Cards, any grouping",
                            r"(?<![\d.,-])(?<![A-Za-z]{2}\d\d )[2-6]\d{1,5}(?:[ ._-]{1,2}\d{2,6}){1,5}(?![\d]|[.,-]\d)"
                            r"|(?<![\d.,-])[2-6]\d{11,18}(?!\d)", 0.3)

    def __init__(self) -> None:
        super().__init__(patterns=[*CreditCardRecognizer.PATTERNS, self._ANY_GROUPING],
                         replacement_pairs=[("-", ""), (" ", ""), (".", ""), ("_", "")])

    _DATE_FIRST = re.compile(r"(?:19|20)\d\d[ ._-]\d\d[ ._-]\d\d")  # "2024-11-05-0042" is a reference

    def validate_result(self, pattern_text: str) -> bool | None:
        if not 13 <= len(re.sub(r"\D", "", pattern_text)) <= 19 or self._DATE_FIRST.match(pattern_text):
            return False
        return super().validate_result(pattern_text)


class GatedIpRecognizer(_Gated, IpRecognizer):
    """Presidio's IPv4/IPv6 recogniser (validated with ``ipaddress``), gated."""

    GATE = re.compile(r"\d\.\d{1,3}\.\d|[0-9A-Fa-f]?::?[0-9A-Fa-f]")


class OfflineEmailRecognizer(_Gated, EmailRecognizer):
    """Presidio's e-mail pattern; the domain only has to end in an alphabetic label of 2+ letters.

    The stock ``validate_result`` calls ``tldextract.extract``, which fetches the Public Suffix List
    over HTTPS the first time it runs in a process and rejects reserved TLDs (``.example``, ``.test``).
    """

    GATE = re.compile("@")
    _TLD = regex.compile(r"\.[^\W\d_]{2,63}$")

    def validate_result(self, pattern_text: str) -> bool:
        return bool(self._TLD.search(pattern_text.rpartition("@")[2]))


class StdnumIbanRecognizer(_Gated, IbanRecognizer):
    """Presidio's IBAN matching (including its trailing-group fallback), any letter case, validated
    by python-stdnum: ISO 7064 mod 97-10 check digits plus the country's BBAN format."""

    GATE = re.compile(r"[A-Za-z]{2}\d{2}")

    def __init__(self) -> None:
        super().__init__(regex_flags=regex.DOTALL | regex.MULTILINE | regex.IGNORECASE)

    def validate_result(self, pattern_text: str) -> bool:
        return _iban.is_valid(regex.sub(r"[\s-]", "", pattern_text).upper())


class SsnRecognizer(_Gated, UsSsnRecognizer):
    """Presidio's US SSN recogniser with its medium-strength pattern only (3-2-4 digits with a
    consistent separator). The "very weak" patterns score 0.05 and only pass with context words,
    which need NLP lemmas this engine does not produce. Presidio's structural checks stay (no
    000/666 area, no 00 group, no 0000 serial, not all one digit); its published sample numbers
    (123-45-6789 ...) are still masked."""

    GATE = re.compile(r"\d{3}[- .]\d{2}[- .]\d{4}")
    _SAMPLES = {"123456789", "987654320", "078051120"}

    def __init__(self) -> None:
        super().__init__(patterns=[p for p in UsSsnRecognizer.PATTERNS if p.score >= 0.5])

    def invalidate_result(self, pattern_text: str) -> bool:
        if regex.sub(r"\D", "", pattern_text) in self._SAMPLES:
            return False
        return super().invalidate_result(pattern_text)


class NoContextEnhancer(ContextAwareEnhancer):
    """Returns results unchanged. Presidio's default ``LemmaContextAwareEnhancer`` needs lemmas
    from an NLP model (the blank engine has none) and deep-copies every result on every call."""

    def __init__(self) -> None:
        super().__init__(context_similarity_factor=0.0, min_score_with_context_similarity=0.0,
                         context_prefix_count=0, context_suffix_count=0)

    def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
        return raw_results


# --- phone numbers ------------------------------------------------------------------------


class FastPhoneRecognizer(PhoneRecognizer):
    """python-phonenumbers validation on phone-shaped candidates only.

    Presidio's ``PhoneRecognizer.analyze`` runs a ``PhoneNumberMatcher`` over the whole text once per
    region, which made it most of the detector's cost. Here a cheap regex finds candidates with 7 to
    15 digits (plus an extension) that are not SSN- or IPv4-shaped; each is then accepted if it is:

    - a VALID number for one of ``supported_regions`` (score 0.75), or
    - written in international form (``+CC`` or ``00CC``) and a POSSIBLE number for that country
      (score 0.6; covers unassigned and fictional ranges such as +44 7700 900xxx), or
    - a POSSIBLE number right after a phone word on the same line ("Phone:", "call me on",
      "Tel.", "mobile", ...) (score 0.5), or
    - written exactly in the North American plan's shape, 3-3-4 digits with one separator throughout
      (``751-954-9268``, ``(833) 719-3994``, ``833.719.3994x1887``, ``+1-743-438-6774``, ``001-748-088-2851``),
      whether or not the area code is assigned (score 0.5: fictional and new ranges are still someone's
      number); a reference number after "order", "ticket", ... is still left alone.
    """

    REGIONS = ("GB", "US", "DE", "FR", "ES", "IT")
    CONTEXT = ["phone", "telephone", "tel", "mobile", "cell", "call", "ring", "whatsapp", "sms", "text me",
               "reach me", "contact", "telefon", "handy", "téléphone", "portable", "teléfono", "móvil",
               "telefono", "cellulare"]
    _CANDIDATE = regex.compile(
        r"(?<![\w+./#-])(?<!\d,)(?:\+|\b00)?\(?\d[\d \t().-]{5,24}\d"
        r"(?:[ \t]?(?:x|ext\.?|extension)[ \t]?\d{1,6})?(?![\w/]|[.,]\d)")
    _DIGITS = regex.compile(r"\d")
    _NANP = regex.compile(r"(?:(?:\+|00)?1[ .-]?)?(?:\(\d{3}\)[ ]?\d{3}-\d{4}|\d{3}([.-])\d{3}\1\d{4}|\d{3} \d{3} \d{4})"
                          r"(?:[ \t]?(?:x|ext\.?|extension)[ \t]?\d{1,6})?")
    # SSNs (3-2-4) and dotted quads parse as valid numbers in some regions (their own recognisers own
    # them); ISO dates start reference numbers ("2024-11-05-0042").
    _NOT_PHONE = regex.compile(r"\d{3}-\d{2}-\d{4}|\d{1,3}(?:\.\d{1,3}){3}|(?:19|20)\d\d-\d\d-\d\d\b.*")
    # A national-format number right after one of these words is a reference, not a phone number.
    _REFERENCE_BEFORE = regex.compile(
        r"(?i:\b(?:order|ticket|ref|reference|invoice|tracking|account|acct|transaction|case|customer|"
        r"contract|policy|member|id)\b)[ \t]*(?:number|no\.?|nr\.?|id)?[ \t]*[:.#]?[ \t]*$")

    def __init__(self, regions: tuple[str, ...] = REGIONS) -> None:
        super().__init__(context=self.CONTEXT, supported_regions=regions, leniency=1)
        words = "|".join(regex.escape(w) for w in sorted(self.CONTEXT, key=len, reverse=True))
        self._context_before = regex.compile(rf"(?i:\b(?:{words})\b)[^\n\d]{{0,25}}$")

    def analyze(self, text: str, entities, nlp_artifacts=None) -> list[RecognizerResult]:
        results = []
        for cand in self._CANDIDATE.finditer(text):
            chunk = cand.group()
            n_digits = len(self._DIGITS.findall(chunk.partition("x")[0]))  # without an extension
            if not 7 <= n_digits <= 15 or self._NOT_PHONE.fullmatch(chunk):  # E.164: at most 15 digits
                continue
            international = chunk.startswith(("+", "00"))
            if not international and self._REFERENCE_BEFORE.search(text, max(0, cand.start() - 30), cand.start()):
                continue
            found, score = self._numbers(chunk, possible=False), 0.75
            if not found:
                if international or self._context_before.search(text, max(0, cand.start() - 40), cand.start()):
                    found, score = self._numbers(chunk, possible=True), (0.6 if international else 0.5)
            if not found and self._NANP.fullmatch(chunk):
                found, score = [(0, len(chunk))], 0.5
            for start, end in found:
                results.append(RecognizerResult(
                    self.supported_entities[0], cand.start() + start, cand.start() + end, score,
                    recognition_metadata={RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                                          RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id}))
        return results

    def _numbers(self, chunk: str, possible: bool) -> list[tuple[int, int]]:
        """``[(0, len(chunk))]`` if the candidate parses as a VALID (or POSSIBLE) number: once for an
        international number, else for each region in turn."""
        check = phonenumbers.is_possible_number if possible else phonenumbers.is_valid_number
        for region in ((None,) if chunk.startswith("+") else self.supported_regions):
            try:
                if check(phonenumbers.parse(chunk, region)):
                    return [(0, len(chunk))]
            except phonenumbers.NumberParseException:
                pass
        return []


# --- PERSON -------------------------------------------------------------------------------------

# A capitalised name word: "Maria", "Jean-Luc", "O'Neill", "McDonald", "Çamurcuoğlu", "Ngozi".
_NAME_WORD = r"\p{Lu}[\p{L}\p{M}]*(?:['’-]\p{L}[\p{L}\p{M}]*)*"
_PARTICLE = r"(?:de|da|di|do|du|del|della|der|den|des|dos|das|la|le|van|von|zu|ter|ten|y|e|bin|ben|al|el|ibn)"
_NAME = rf"{_NAME_WORD}(?:[ \t]+(?:{_PARTICLE}[ \t]+){{0,2}}{_NAME_WORD}){{0,3}}"

_INTRO = (r"my name is|my name's|my full name is|name is|this is|i am|i'm|"
          r"je m'appelle|je m’appelle|mon nom est|ich heiße|ich heisse|mein name ist|"
          r"me llamo|mi nombre es|mi chiamo|il mio nome è")
_FIELD = r"name|full name|account holder|account name|customer|nom|nombre|nome|vorname und name"
_SIGN_OFF = (r"regards|kind regards|best regards|warm regards|warmest regards|many thanks|thanks|thank you|"
             r"thanks again|cheers|best|best wishes|all the best|sincerely|yours sincerely|yours faithfully|"
             r"yours|rgds|br|cordialement|bien à vous|bien cordialement|merci|salutations|"
             r"mit freundlichen grüßen|mit freundlichen grüssen|viele grüße|liebe grüße|beste grüße|gruß|danke|"
             r"saludos|un saludo|atentamente|gracias|muchas gracias|cordiali saluti|distinti saluti|saluti|"
             r"grazie|grazie mille|un saluto")

# Words that follow an introduction or sign-off but are not names ("Thanks, Google Pay works now"
# is already excluded by requiring the name to end its line).
NAME_STOP = frozenset({
    "I", "Hi", "Hello", "Hey", "Thanks", "Thank", "Regards", "Best", "The", "My", "This", "Please", "Support",
    "Team", "Card", "Bank", "Northwind", "Good", "Morning", "Afternoon", "Evening", "Dear", "Sent", "From",
    "Kind", "Many", "Not", "Very", "So", "Still", "Just", "Also", "Now", "Here", "Sorry", "Again", "Urgent",
    "URGENT", "ASAP", "Apple", "Google", "Visa", "Mastercard", "It", "We", "You", "Your", "A", "An", "On",
    "In", "At", "And", "But", "Or", "If", "When", "Why", "How", "What", "Where", "Can", "Could", "Would",
    "Will", "Is", "Are", "Was", "Re", "Fwd", "Yes", "No", "OK", "Ok", "Okay", "Monday", "Tuesday",
    "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "British", "American", "German", "French",
    "Spanish", "Italian", "Customer", "Client", "Kunde", "Cliente",
})
# A name whose first word is not a stop word (checked inside the regex so it can backtrack).
_SELF_NAME = (r"(?!(?:" + "|".join(sorted(NAME_STOP, key=len, reverse=True)) + r")(?![\p{L}\p{M}'’-]))"
              + _NAME)


class SelfIntroductionRecognizer(EntityRecognizer):
    """PERSON names a message states about its author: "my name is Ana Souza", "this is Timothée",
    "Name: Kwame Mensah" (form fields), and the signature line after a sign-off ("Kind regards,"
    newline "Björn Ødegård"); English, French, German, Spanish and Italian phrasings. The trigger
    phrase is case-insensitive, the name must be capitalised; a signature name must end its line."""

    _PATTERNS = (
        (regex.compile(rf"(?i:\b(?:{_INTRO}))[ \t]+({_SELF_NAME})"), 0.6),
        (regex.compile(rf"(?im:^[ \t]*(?:{_FIELD})[ \t]*:)[ \t]*({_SELF_NAME})[ \t]*(?=\n|\Z)"), 0.7),
        (regex.compile(rf"(?im:^[ \t]*(?:{_SIGN_OFF})[ \t]*[,.!]?)[ \t]*\n?[ \t]*({_SELF_NAME})[ \t]*(?=\n|\Z)"), 0.65),
    )
    _WORDS = regex.compile(r"\S+")

    def __init__(self) -> None:
        super().__init__(supported_entities=["PERSON"], name="SelfIntroductionRecognizer")

    def load(self) -> None:
        pass

    def analyze(self, text: str, entities, nlp_artifacts=None) -> list[RecognizerResult]:
        out = []
        for pattern, score in self._PATTERNS:
            for m in pattern.finditer(text):
                words = list(self._WORDS.finditer(m.group(1)))
                while words and words[-1].group() in NAME_STOP:  # "this is Maria Here" -> "Maria"
                    words.pop()
                out.append(RecognizerResult("PERSON", m.start(1), m.start(1) + words[-1].end(), score,
                                            recognition_metadata={
                                                RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                                                RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id}))
        return out


class KnownNameRecognizer(EntityRecognizer):
    """PERSON: the names this message is known to carry (whole names and their parts, see
    ``pii.name_terms``), matched case-insensitively on word boundaries, like ``\\bterm\\b`` with
    IGNORECASE. Built for every sender, so it compiles nothing: it looks the lower-cased terms up with
    ``str.find`` (a regex deny-list costs a compile per sender, several times the detection itself)."""

    def __init__(self, terms: tuple[str, ...]) -> None:
        super().__init__(supported_entities=["PERSON"], name="KnownNameRecognizer")
        self.terms = tuple(_lower(t) for t in terms if t)

    def load(self) -> None:
        pass

    def analyze(self, text: str, entities, nlp_artifacts=None) -> list[RecognizerResult]:
        low = _lower(text)
        out = []
        for term in self.terms:
            at = low.find(term)
            while at >= 0:
                end = at + len(term)
                if not (_is_word_char(low, at - 1) or _is_word_char(low, end)):
                    out.append(RecognizerResult("PERSON", at, end, 0.95, recognition_metadata={
                        RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                        RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id}))
                at = low.find(term, at + 1)
        return out


def _lower(s: str) -> str:
    """``s.lower()`` with the same length as ``s``, so offsets carry over: "İ" (whose full lower case
    is two characters) becomes "i", its simple case mapping, as in ``re.IGNORECASE``."""
    low = s.lower()
    if len(low) != len(s):
        low = "".join(c.lower() if len(c.lower()) == 1 else c for c in s.replace("İ", "i"))
    return low


def _is_word_char(s: str, i: int) -> bool:
    """``s[i]`` exists and is what ``re``'s ``\\w`` matches."""
    return 0 <= i < len(s) and (s[i].isalnum() or s[i] == "_")


# --- LOCATION --------------------------------------------------------------------------------------

_NUM = r"(?!(?:19|20)\d\d\b)\d{1,4}"  # a house number, not a year
_HOUSE = rf"{_NUM}(?:[ \t]?[a-zA-Z](?![\p{{L}}]))?(?:[ \t]?[/-][ \t]?\d{{1,4}})?"
_US_HOUSE = rf"(?:\d{{5}}|{_HOUSE})"  # US house numbers run to five digits
_WORD = r"\p{Lu}[\p{L}\p{M}'’.-]*"
_LOWER_LINK = r"(?:de|del|de la|de las|de los|des|du|d'|di|della|dei|delle|degli|la|le|les|l'|y|e|am|an der|von)"
_WORDS = rf"{_WORD}(?:[ \t]+(?:{_LOWER_LINK}[ \t]*)?{_WORD}){{0,3}}"
_NOT_QUANTITY = (r"(?![ \t]*(?i:days?|times?|hours?|weeks?|months?|years?|minutes?|mins?|euros?|eur|usd|gbp|"
                 r"dollars?|pounds?|%|x\b|am\b|pm\b))")
_UNIT = (r"(?:,?[ \t]+(?i:apt\.?|apartment|suite|ste\.?|unit|flat|floor|piso|puerta|planta|escalera|"
         r"appartamento|piano|interno|scala|étage|bâtiment|wohnung)[ \t]*\d{1,4}[a-zA-Z]?"
         r"|,?[ \t]+\d{1,2}[ºª°][ \t]?[A-Za-z]?)?")
_POSTCODE = (r"(?:[A-Z]{1,2}\d[A-Z\d]?[ \t]?\d[A-Z]{2}"  # UK
             r"|\d{4}[ \t]?[A-Z]{2}(?![\p{L}])"  # NL
             r"|\d{2}-\d{3}|\d{3}[ \t]\d{2}"  # PL, SE/CZ
             r"|(?:[A-Z]-)?\d{4,5}(?:-\d{4})?)")  # DE/FR/ES/IT/US (ZIP+4)
# A city: capitalised words, hyphenated or with a lower-case particle ("Saint-Jean-de-Luz", "Caron-sur-Mer",
# "Castelvecchio Di Rocca Barbena"), never running on into the next sentence ("Ulm. My card").
_CITY_WORD = r"\p{Lu}[\p{L}\p{M}'’]*+(?!\d)"  # a whole word, not the start of "ST9X"
_CITY = (rf"{_CITY_WORD}(?:(?:[ \t-]|[ \t-](?:sur|sous|am|an|upon|on|de|del|di|la|le|les|en)[ \t-]){_CITY_WORD}){{0,3}}"
         rf"(?![\d.]\w)")
_TAIL = (rf"(?:(?:[ \t]*,[ \t]*|[ \t]+){_POSTCODE}(?:[ \t]+{_CITY})?(?![\p{{L}}\d])"
         rf"|[ \t]*,[ \t]*(?:{_POSTCODE}[ \t]+)?{_CITY}(?:[ \t]+\({_WORD}\))?(?:[ \t]+{_POSTCODE})?){{0,3}}")

# English street types: the USPS standard suffixes (Publication 28) and British ones, singular (a
# plural "s" is allowed), plus the usual abbreviations. Words that mostly mean something else in
# banking text (Branch, Key, Union, Club, Station, Run, Rest, Land) are left out.
_EN_TYPES = (r"alley|annex|arcade|avenue|bayou|beach|bend|bluff|bottom|boulevard|bridge|brook|burg|bypass|camp|"
             r"canyon|cape|causeway|center|centre|circle|circus|cliff|close|common|corner|course|court|cove|"
             r"creek|crescent|crest|croft|crossing|crossroad|curve|dale|dam|divide|drive|drove|embankment|"
             r"esplanade|estate|expressway|extension|fall|ferry|field|flat|ford|forest|forge|fork|fort|freeway|"
             r"garden|gardens|gate|gateway|glen|grange|green|grove|harbor|harbour|haven|heights|highway|hill|"
             r"hollow|inlet|island|isle|junction|knoll|lake|landing|lane|light|lock|lodge|loop|mall|manor|"
             r"meadow|mews|mill|motorway|mount|mountain|neck|orchard|oval|overpass|parade|park|parkway|pass|"
             r"passage|path|pike|pine|place|plain|plaza|point|port|prairie|quay|radial|ramp|ranch|rapid|ridge|"
             r"rise|river|road|route|row|shoal|shore|skyway|spring|spur|square|stravenue|stream|street|summit|"
             r"terrace|throughway|trace|track|trafficway|trail|tunnel|turnpike|underpass|valley|viaduct|view|"
             r"village|ville|vista|walk|wall|way|well|wharf|yard")
_EN_ABBREVIATIONS = r"st|rd|ave|dr|ln|ct|blvd|pl|sq|hwy|pkwy|cres|ter|cl|gdns"
_DE_SUFFIXES = (r"straße|strasse|str\.|weg|gasse|platz|allee|ring|damm|ufer|chaussee|steig|pfad|markt|"
                r"promenade|graben|kamp|brücke|hof|berg|tor|wall")
_FR_TYPES = (r"rue|avenue|av\.|boulevard|bd\.?|chemin|impasse|allée|place|quai|route|cours|square|passage|"
             r"voie|rond-point|faubourg|sentier|esplanade|parvis|villa|cité|résidence|hameau|lieu-dit")
_ES_TYPES = (r"Calle|C/|C\.|Pasadizo|Avenida|Avda\.|Av\.|Paseo|Plaza|Pza\.|Camino|Carretera|Ctra\.|Ronda|Travesía|"
             r"Glorieta|Callejón|Cañada|Vial|Pasaje|Rambla|Alameda|Urbanización|Acceso|Bajada|Cuesta|"
             r"Plazuela|Partida|Vía|Costanilla|Rúa|Passeig|Carrer|Carrera")
_IT_TYPES = (r"Via|Viale|Piazza|Piazzale|Corso|Largo|Vicolo|Strada|Contrada|Borgo|Lungomare|Lungotevere|"
             r"Vico|Salita|Canale|Rotonda|Stretto|Incrocio|Calle|Campo|Località|Loc\.|Frazione|Traversa|"
             r"Galleria|Circonvallazione|Rampa")


def _address_patterns() -> list[Pattern]:
    en = (rf"(?:\b(?i:flat|apartment|apt\.?|unit|studio|suite)[ \t]+\d{{1,4}}[A-Za-z]?,?[ \t]+(?:{_HOUSE},?[ \t]+)?"
          rf"|\b{_US_HOUSE},?[ \t]+)(?:{_WORD}[ \t]+){{1,4}}(?i:(?:{_EN_TYPES})s?|(?:{_EN_ABBREVIATIONS})\.?)"
          rf"(?![\p{{L}}]){_UNIT}{_TAIL}")
    en_unit = rf"\b{_US_HOUSE}[ \t]+(?:{_WORD}[ \t]+){{1,3}}(?i:apt\.|apartment|suite|unit)[ \t]+\d{{1,5}}{_TAIL}"
    # One (possibly hyphenated) compound word ending in a street suffix ("Schwitalallee",
    # "Grit-Wulf-Gasse", "Hauptstr.", "Straße"), optionally after an adjective ("Berliner Straße").
    # Words are taken whole (possessive) and the suffix checked by look-behind: one test per word.
    de = (rf"\b(?:\p{{Lu}}\p{{L}}*+(?<=er|e|en|es)[ \t])?\p{{Lu}}[\p{{L}}\p{{M}}'’.-]*+(?<=(?i:{_DE_SUFFIXES}))"
          rf"[ \t]*{_HOUSE}(?![\p{{L}}\d]){_NOT_QUANTITY}{_UNIT}{_TAIL}")
    de_prep = (rf"\b(?:Am|An der|An den|Auf dem|Auf der|Im|In der|In den|Unter den|Zum|Zur|Hinter der|Vor dem)"
               rf"[ \t]+{_WORD}[ \t]+{_HOUSE}(?![\p{{L}}\d]){_NOT_QUANTITY}{_TAIL}")
    fr_street = rf"(?i:(?:{_FR_TYPES}))[ \t]+(?:(?i:de la|de l'|de l’|des|du|de|d'|d’)[ \t]*)?{_WORDS}"
    fr = rf"\b{_HOUSE}(?:[ \t]?(?i:bis|ter))?,?[ \t]+{fr_street}{_TAIL}"
    # without a house number only when a five-digit postcode follows ("avenue Garnier, Lyon, 69003")
    fr_no_number = rf"\b{fr_street}(?=(?:,[ \t]*{_CITY})?,?[ \t]+\d{{5}}\b){_TAIL}"
    es_it = (rf"\b(?:{_ES_TYPES}|{_IT_TYPES})[ \t]+(?:(?:{_LOWER_LINK})[ \t]*)?{_WORDS},?[ \t]+"
             rf"(?:(?i:nº|n\.º|no\.?|n\.|núm\.|num\.|n°)[ \t]?)?{_HOUSE}(?![\p{{L}}\d]){_NOT_QUANTITY}{_UNIT}{_TAIL}")
    return [Pattern(name, rx, score) for name, rx, score in (
        ("street address (en)", en, 0.6), ("street address with unit (en)", en_unit, 0.6),
        ("street address (de)", de, 0.6), ("street address (de, preposition)", de_prep, 0.5),
        ("street address (fr)", fr, 0.6), ("street address (fr, no number)", fr_no_number, 0.5),
        ("street address (es/it)", es_it, 0.6))]


class StreetAddressRecognizer(_Gated, PatternRecognizer):
    """LOCATION: street addresses in English ("221B Baker Street, London", "337 Sanders Wall Apt. 328"),
    German ("Hauptstraße 5", "Am Markt 3"), French ("12, rue de la Paix"), Spanish ("Calle Mayor 3,
    2º B") and Italian ("Via Roma 10", "Piazza Jacuzzi, 789") forms, plus a following city/postcode.
    Letter case matters for names (the type words themselves are case-insensitive, except Spanish and
    Italian ones that open the address, so "via Google Pay 2" stays text)."""

    GATE = re.compile(r"\d")  # every form needs a house number or a postcode

    def __init__(self) -> None:
        super().__init__(supported_entity="LOCATION", name="StreetAddressRecognizer",
                         patterns=_address_patterns(), global_regex_flags=regex.MULTILINE | regex.V0)
