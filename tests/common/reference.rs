//! The brute-force reference: every admitted request kept as an event with its instant,
//! and usage summed over the events afresh at every question. Slow and obviously right.

/// One admitted request.
#[derive(Clone, Debug)]
pub struct Event {
    pub at_ms: u64,
    pub amounts: [u64; 3],
    pub settled: bool,
}

pub struct Reference {
    pub window_ms: u64,
    pub precision_ms: u64,
    pub events: Vec<Event>,
}

impl Reference {
    pub fn new(window_ms: u64, precision_ms: u64) -> Reference {
        Reference {
            window_ms,
            precision_ms,
            events: Vec::new(),
        }
    }

    fn bucket(&self, t: u64) -> u64 {
        t / self.precision_ms
    }

    /// The exact sliding sum over the instants (now - span, now].
    pub fn exact(&self, now: u64, span: u64) -> [u64; 3] {
        let mut sum = [0; 3];
        for e in self
            .events
            .iter()
            .filter(|e| e.at_ms + span > now && e.at_ms <= now)
        {
            for (s, a) in sum.iter_mut().zip(e.amounts) {
                *s += a;
            }
        }
        sum
    }

    /// The sum the engine is specified to see: whole buckets, the current one and the
    /// `window / precision` before it.
    pub fn bucketed(&self, now: u64) -> [u64; 3] {
        let b = self.bucket(now);
        let n = self.window_ms / self.precision_ms;
        let mut sum = [0; 3];
        for e in self
            .events
            .iter()
            .filter(|e| self.bucket(e.at_ms) + n >= b && e.at_ms <= now)
        {
            for (s, a) in sum.iter_mut().zip(e.amounts) {
                *s += a;
            }
        }
        sum
    }

    pub fn fits(&self, now: u64, want: [u64; 3], limits: [u64; 3]) -> bool {
        let used = self.bucketed(now);
        (0..3).all(|k| used[k] + want[k] <= limits[k])
    }

    /// The first instant from `now` on, at a bucket boundary or now itself, at which `want`
    /// fits if nothing else arrives; found by trying each instant.
    pub fn first_fit(&self, now: u64, want: [u64; 3], limits: [u64; 3]) -> Option<u64> {
        let b = self.bucket(now);
        let n = self.window_ms / self.precision_ms;
        (1..=n + 2)
            .map(|j| (b + j) * self.precision_ms)
            .find(|t| self.fits(*t, want, limits))
    }

    pub fn admit(&mut self, now: u64, amounts: [u64; 3]) -> usize {
        self.events.push(Event {
            at_ms: now,
            amounts,
            settled: false,
        });
        self.events.len() - 1
    }

    /// Settles event `i` to `actual` output tokens if it is unsettled and its bucket is
    /// still in the window; returns the change applied.
    pub fn settle(&mut self, i: usize, now: u64, actual: u64) -> Option<i64> {
        let n = self.window_ms / self.precision_ms;
        let b = self.bucket(now);
        let e_bucket = self.bucket(self.events[i].at_ms);
        let e = &mut self.events[i];
        if e.settled {
            return None;
        }
        e.settled = true;
        if e_bucket + n < b {
            return None;
        }
        let delta = actual as i64 - e.amounts[2] as i64;
        e.amounts[2] = actual;
        Some(delta)
    }
}
