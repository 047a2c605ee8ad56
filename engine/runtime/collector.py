"""How often CPython's cycle collector runs in a long-lived service process.

    collect_cycles_seldom()   # at the start of `linkcrm serve` and `linkcrm worker`

Reference counting frees nearly everything the receiver and the worker make; the cycle
collector only finds garbage that refers to itself. By default it walks the youngest objects
every 700 allocations net of frees and the older ones every tenth and hundredth time, and each
walk visits every object of those generations: with thousands of events in flight (the worker's
batch window) the older walks grow long, and they ran often enough to take a tenth of the
worker's time (py-spy put it inside whatever allocated: `link_fields` had 4.5% of a Salesforce
drain's samples). `gc.freeze()` takes what exists at start-up (modules, settings) out of every
walk for good; the higher thresholds make the walks 70 times rarer, while cyclic garbage still
goes within a few hundred thousand allocations (bench_receiver.py prints the peak RSS).
"""

from __future__ import annotations

import gc

# (youngest, middle, oldest): a young walk every 50,000 allocations, a middle one every 20 of
# those, an old one every 100 middle ones (CPython also waits until the old walk has a quarter
# of the old objects' number to look at). A/B on one host, the thresholds alone: the Salesforce
# drain 9.0-9.3 s -> 7.8-8.0 s, the end-to-end local drain 2,240-2,480 -> 2,720-2,760 events/s;
# with the freeze too, 7.6-7.9 s and 2,630-2,730 (the host moved: no better, no worse).
THRESHOLDS = (50_000, 20, 100)


def collect_cycles_seldom() -> None:
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
