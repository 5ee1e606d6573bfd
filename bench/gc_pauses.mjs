// Garbage-collection pauses of this Node process, for the benchmark's harness processes: a
// pause of the load generator or of the devices delays every call in flight and then releases
// them in a burst, which a server under test pays for (see docs/benchmarks.md).
//
//   const gc = watchGcPauses();   // starts observing
//   gc.reset();                   // at the start of the measured window
//   gc.summary();                 // {count, total_ms, max_ms, over_5ms}

import { PerformanceObserver } from 'node:perf_hooks';

export function watchGcPauses() {
  let pauses = [];
  const observer = new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) pauses.push(entry.duration);
  });
  observer.observe({ entryTypes: ['gc'] });
  return {
    reset() {
      pauses = [];
    },
    summary() {
      return {
        count: pauses.length,
        total_ms: pauses.reduce((sum, ms) => sum + ms, 0),
        max_ms: pauses.reduce((max, ms) => Math.max(max, ms), 0),
        over_5ms: pauses.filter((ms) => ms > 5).length,
      };
    },
  };
}
