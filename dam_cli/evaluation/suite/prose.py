"""Prose haystack: sentences from a small hand-written grammar in seven styles (diary, field notes,
manual, weather, meeting minutes, recipes, local history).

Sentence `i` of seed `s` is a pure function of (s, i); a paragraph of `PARAGRAPH` sentences keeps
one style. Slots are filled from word lists and numbers, so a sentence repeats only by rare chance.
Self-contained on purpose: no stdlib docstrings (they change between Python versions), no downloads.
"""

from __future__ import annotations

import re

from dam_cli.evaluation.suite.rng import Rng

PARAGRAPH = 5  # sentences per paragraph; one style per paragraph

_W = {
    "first": "Ada Bruno Clara Dmitri Elena Farid Greta Hugo Ines Jonas Kira Luca Maren Nils Olga Pavel Quinn Rosa "
             "Samir Tilda Uma Viktor Wanda Xavier Yara Zeno Agnes Bram Celia Dario".split(),
    "last": "Abbott Brandt Castell Duarte Eberly Fonseca Garnier Holm Ivers Jansen Kowal Lindqvist Moreau Novak "
            "Okafor Pereira Quist Rowan Sauer Tamm Ulrich Varga Weller Yilmaz Zeller".split(),
    "role": ["the baker", "the ferryman", "the surveyor", "the schoolteacher", "the night porter", "the miller",
             "the harbour master", "the botanist", "the old locksmith", "the postmistress", "the bookbinder",
             "the stationmaster", "the beekeeper", "the clockmaker", "the lighthouse keeper"],
    "place": ["old harbour", "north ridge", "market square", "river bend", "lighthouse", "apple orchard",
              "railway station", "reading room", "water mill", "limestone quarry", "east gate", "salt marsh",
              "pine forest", "stone bridge", "chapel yard", "towpath", "village green", "observatory",
              "boatyard", "vineyard", "fish market", "customs house", "tram depot", "botanical garden"],
    "adj": ["narrow", "weathered", "crowded", "silent", "freshly painted", "half-flooded", "sunlit", "draughty",
            "overgrown", "busy", "forgotten", "windswept", "tidy", "crooked", "newly paved", "echoing", "muddy",
            "fragrant", "frost-covered", "dimly lit", "cheerful", "gloomy", "spacious", "cramped"],
    "thing": ["a rusted anchor", "a blue wheelbarrow", "a stack of crates", "an empty birdcage", "a broken kite",
              "a row of bicycles", "a painted signpost", "a tin of buttons", "a folded map", "a copper kettle",
              "a basket of pears", "a torn umbrella", "a wooden ladder", "a pair of oars", "a box of letters",
              "a chipped teapot", "a coil of rope", "a faded poster", "a lost glove", "a jar of honey"],
    "memory": ["his first winter in the city", "a summer spent on the coast", "the flood of the previous year",
               "an argument with her brother", "the day the mill burned", "a song from school",
               "the smell of the bakery at dawn", "the long drive north", "an unanswered letter",
               "the quiet years after the war"],
    "feeling": ["relieved", "uneasy", "curious", "tired but content", "oddly cheerful", "restless", "homesick",
                "hopeful", "distracted", "grateful"],
    "animal": ["red fox", "grey heron", "common toad", "barn owl", "river otter", "pine marten", "sand lizard",
               "harbour seal", "field vole", "stag beetle", "mountain hare", "little egret", "fire salamander",
               "green woodpecker", "water shrew", "brown hare", "natterjack toad", "hazel dormouse"],
    "region": ["coastal dunes", "upland bogs", "chalk grassland", "mixed woodland", "river valleys",
               "alpine meadows", "reed beds", "heathland", "old hedgerows", "limestone pavements",
               "tidal estuaries", "beech forests"],
    "food": ["beetles", "small fish", "earthworms", "berries", "seeds", "snails", "young shoots", "moths",
             "crayfish", "acorns", "grubs", "windfall apples"],
    "season": ["early spring", "late spring", "midsummer", "late summer", "autumn", "early winter", "deep winter"],
    "month": "January February March April May June July August September October November December".split(),
    "device": ["printer", "water pump", "router", "coffee grinder", "sewing machine", "thermostat", "drill",
               "dishwasher", "projector", "lawn mower", "bread maker", "label printer", "heat pump", "scanner"],
    "part": ["filter", "power cable", "paper tray", "drive belt", "intake valve", "fuse", "battery pack",
             "blade guard", "water tank", "lid seal", "cooling fan", "hinge", "feed roller", "display panel"],
    "state": ["firmly seated", "completely dry", "switched off", "free of dust", "locked in place",
              "at room temperature", "fully charged", "clear of obstructions", "properly aligned",
              "disconnected from the mains"],
    "symptom": ["makes a grinding noise", "blinks its amber light", "stops after a few seconds", "runs hot",
                "refuses to start", "shows an error code", "leaks at the base", "vibrates strongly",
                "loses its settings", "smells of burnt dust"],
    "fix": ["clean the filter", "reseat the cable", "release the latch", "reset the breaker", "empty the tank",
            "tighten the screws", "replace the fuse", "clear the vent", "update the firmware", "descale the boiler"],
    "weather": ["a band of rain", "a thick sea fog", "a cold front", "a line of thunderstorms", "light drizzle",
                "a dry easterly wind", "low cloud", "a heavy snow shower", "a warm southerly breeze", "hail"],
    "landform": ["estuary", "headland", "valley floor", "moorland", "lake", "foothills", "ridge", "plain",
                 "harbour mouth", "forest edge", "river delta", "upper slopes"],
    "behaviour": ["sheltered under the hedges", "fell silent", "flew low over the water", "gathered on the roofs",
                  "fed greedily", "moved to higher ground", "stayed in their burrows", "called from the reeds"],
    "team": ["logistics", "finance", "design", "support", "research", "facilities", "sales", "platform",
             "procurement", "quality", "legal", "training"],
    "decision": ["postpone the office move", "hire two more analysts", "renegotiate the cleaning contract",
                 "retire the old ticket system", "publish the survey results", "freeze travel spending",
                 "pilot a four-day rota", "rewrite the onboarding guide", "consolidate the two warehouses",
                 "review supplier invoices monthly", "open a second help desk", "drop the paper forms"],
    "metric": ["average response time", "monthly churn", "warehouse throughput", "energy use",
               "the number of open tickets", "customer satisfaction", "invoice backlog", "staff turnover",
               "late deliveries", "print costs"],
    "compare": ["well above", "slightly above", "close to", "just below", "far below"],
    "dayadj": ["grey", "bright", "foggy", "windy", "cold", "humid", "clear", "drizzly", "still", "mild"],
    "button": ["reset", "power", "pairing", "menu", "start", "mode", "eject"],
    "signal": ["restarts", "beeps twice", "shows a green light", "returns to the main screen", "goes quiet"],
    "trend": ["rose", "fell", "dropped", "climbed", "improved", "worsened"],
    "period": ["the previous quarter", "last year", "the same month last year", "the spring campaign",
               "the pilot phase", "the first half of the year"],
    "ingredient": ["the onions", "the butter", "the flour", "the lentils", "the carrots", "the rice", "the garlic",
                   "the chopped apples", "the sugar", "the mushrooms", "the chickpeas", "the cream", "the leeks",
                   "the oats", "the grated cheese", "the tomatoes", "the ginger", "the spinach"],
    "cookverb": ["stir", "fold", "simmer", "whisk", "toss", "roast", "fry", "knead", "blend", "bake"],
    "texture": ["it turns golden", "the sauce thickens", "the dough is smooth", "the edges begin to crisp",
                "the mixture holds its shape", "the liquid has reduced by half", "it smells nutty",
                "the grains are tender"],
    "structure": ["a covered market", "a stone granary", "a footbridge", "a public bathhouse", "a bell tower",
                  "a lending library", "a brick schoolhouse", "a water tower", "a concert hall", "a ropewalk"],
    "townhead": "Ash Bram Cold Elm Fen Gold Hart Kings Lang Mill Oak Red Salt Stan Thorn Wey Whit Wolf".split(),
    "towntail": "bury ford ham ley mouth stead ton wick worth field haven moor".split(),
    "event": ["a great storm", "the arrival of the railway", "a long drought", "a fire in the tannery",
              "the closing of the mines", "a cholera outbreak", "a bumper harvest", "the first regatta"],
}

_STYLES = {
    "diary": [
        "On a {dayadj} morning in {season}, {person} walked past the {place} and noticed {thing}.",
        "{Person} stopped at the {place} for {n} minutes, feeling {feeling}.",
        "The {adj} {place} reminded {person} of {memory}.",
        "Near the {place}, someone had left {thing} beside {thing}.",
        "{Person} wrote in the notebook that the {place} looked {adj} after {weather}.",
        "By the time {person} reached the {place}, it was almost {clock}.",
    ],
    "field": [
        "The {animal} is found mostly in {region}, where it feeds on {food} and {food}.",
        "In {season} the {animal} moves from {region} towards {region}.",
        "A survey in {year} counted {count} pairs of the {animal} along the {landform}.",
        "{Person} recorded a {animal} near the {place} in {month} {year}.",
        "Unlike the {animal}, the {animal} rarely leaves {region}, even in {season}.",
        "The young of the {animal} stay close to the nest for about {n} days before hunting {food}.",
    ],
    "manual": [
        "Before you service the {device}, make sure the {part} is {state}.",
        "If the {device} {symptom}, {fix} and wait {n} minutes before trying again.",
        "Hold the {button} button for {small} seconds until the {device} {signal}.",
        "Check that the {part} is {state} every {n} weeks.",
        "When the {device} {symptom}, the {part} is usually the cause.",
        "Never open the {device} within {n} minutes of use: the {part} may still be warm.",
    ],
    "weather": [
        "By {clock}, {weather} had moved across the {landform} and the birds {behaviour}.",
        "Forecasters expect {weather} over the {landform} with gusts near {dist} kilometres per hour.",
        "After {weather} on {weekday}, the {landform} stayed {adj} until evening.",
        "Temperatures along the {landform} reached {temp} degrees on {weekday}, {compare} the {month} average.",
        "Along the {landform}, the {animal} and its neighbours {behaviour} as {weather} rolled in.",
    ],
    "minutes": [
        "On {weekday} the {team} team agreed to {decision} before the end of {month}.",
        "{Person} reported that {metric} {trend} by {pct} percent compared with {period}.",
        "Item {n}: the {team} team will {decision} if the budget allows.",
        "{Person} asked whether the {team} team could {decision} by week {week}.",
        "It was noted that {metric} {trend} steadily after {period}, by about {pct} percent in all.",
        "The meeting closed at {clock}; the next one is set for {weekday} {day} {month}.",
    ],
    "recipe": [
        "{Cookverb} {ingredient} with {ingredient} for {n} minutes, until {texture}.",
        "Add {grams} grams of {ingredient_bare} and {cookverb} gently until {texture}.",
        "Set the oven to {oven} degrees and {cookverb} {ingredient} for {n} minutes.",
        "Leave {ingredient} to rest for {n} minutes, then {cookverb} everything again.",
        "Should {ingredient} dry out, add {grams} millilitres of water and {cookverb} once more.",
    ],
    "history": [
        "In {year}, the town of {town} built {structure} near the {place}.",
        "After {event} in {year}, {town} lost nearly {pct} percent of its people.",
        "In {year}, {person} restored {structure} in {town}.",
        "Records from {year} mention {count} households living between {town} and {town}.",
        "Until {event}, {town} was known mainly for its {place}.",
        "{Person} left {town} in {year} and settled near the {place} of {town}.",
    ],
}
STYLES = tuple(_STYLES)
_SLOT = re.compile(r"\{(\w+)\}")
_WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()


def _person(rng: Rng) -> str:
    pick = rng.below(3)
    if pick == 0:
        return f"{rng.choice(_W['first'])} {rng.choice(_W['last'])}"
    return rng.choice(_W["first"]) if pick == 1 else rng.choice(_W["role"])


def _fill(rng: Rng, slot: str) -> str:
    name = slot.lower()
    number = {"n": (3, 45), "small": (2, 9), "year": (1790, 2019), "count": (12, 4800), "pct": (2, 64),
              "dist": (30, 140), "temp": (-8, 36), "week": (2, 51), "day": (1, 28), "grams": (20, 600),
              "oven": (150, 240)}
    if name in number:
        return str(rng.randint(*number[name]))
    if name == "person":
        text = _person(rng)
    elif name == "clock":
        text = f"{rng.randint(5, 22)}:{rng.choice(('00', '10', '15', '20', '30', '40', '45', '50'))}"
    elif name == "weekday":
        text = rng.choice(_WEEKDAYS)
    elif name == "town":
        text = rng.choice(_W["townhead"]) + rng.choice(_W["towntail"])
    elif name == "ingredient_bare":
        text = rng.choice(_W["ingredient"])[4:]
    else:
        text = rng.choice(_W[name])
    return text[0].upper() + text[1:] if slot[0].isupper() else text


def prose_style(seed: int, paragraph: int) -> str:
    """The style of one paragraph: a pure function of (seed, paragraph)."""
    return Rng.keyed("prose-style", seed, paragraph).choice(STYLES)


def prose_sentence(seed: int, index: int) -> str:
    """Sentence `index` of the prose haystack of `seed`."""
    rng = Rng.keyed("prose", seed, index)
    template = rng.choice(_STYLES[prose_style(seed, index // PARAGRAPH)])
    text = _SLOT.sub(lambda m: _fill(rng, m.group(1)), template)
    return text[0].upper() + text[1:]


def prose_words() -> list[str]:
    """Every distinct lowercase word the grammar can emit (for tests and for picking needle words)."""
    words = set()
    for values in _W.values():
        for v in values:
            words.update(re.findall(r"[a-z]+", v.lower()))
    for templates in _STYLES.values():
        for t in templates:
            words.update(re.findall(r"[a-z]+", _SLOT.sub(" ", t).lower()))
    return sorted(words)
