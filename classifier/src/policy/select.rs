//! Resolving label selectors against many label sets at once, for the policy compiler.
//!
//! Input: the label sets of a universe of objects (identities or namespaces), numbered
//! densely. Output: for a [`LabelSelector`], the sorted numbers of the objects it selects.
//!
//! Matching every selector against every object is what dominates compiling a large cluster
//! (policies × identities). An inverted index from `key=value` (and from `key`) to objects lets
//! a selector start from the smallest posting list one of its terms implies, and only confirm
//! those candidates with [`LabelSelector::matches`], which stays the single definition of
//! selector semantics. Selectors with no positive term (`{}`, `NotIn`, `DoesNotExist` only)
//! fall back to a scan of the universe.
//!
//! Invariant: `select` returns exactly the objects for which `matches` is true, in increasing
//! order, whichever candidate list it starts from.

use std::sync::Arc;

use ahash::AHashMap;

use super::model::{LabelSelector, Labels, Operator};

/// An inverted index over the labels of a dense universe of objects.
///
/// It owns its label sets (shared, not copied, with whoever else holds them) so that it can
/// outlive one compilation and grow: [`LabelIndex::push`] appends an object, keeping every
/// posting list in increasing order.
#[derive(Debug, Default)]
pub(crate) struct LabelIndex {
    /// The labels of object `i`.
    labels: Vec<Arc<Labels>>,
    /// Per label key: the objects carrying the key (any value), and per value the objects
    /// carrying `key=value`, each in increasing order. Nested so that a lookup by `&str`
    /// needs no owned key.
    by_key: AHashMap<String, Postings>,
}

/// The posting lists of one label key.
#[derive(Debug, Default)]
struct Postings {
    any: Vec<u32>,
    by_value: AHashMap<String, Vec<u32>>,
}

/// Where `select` starts: a few posting lists whose union is a superset of the answer.
enum Candidates<'i> {
    /// Every object.
    All,
    /// The union of these lists; they are disjoint (different values of one key).
    Lists(Vec<&'i [u32]>),
}

impl LabelIndex {
    /// Indexes the label sets; object `i` is `labels[i]`.
    pub(crate) fn new(labels: Vec<Arc<Labels>>) -> LabelIndex {
        let mut index = LabelIndex {
            labels: Vec::with_capacity(labels.len()),
            by_key: AHashMap::new(),
        };
        for l in labels {
            index.push(l);
        }
        index
    }

    /// Appends an object; returns its number.
    pub(crate) fn push(&mut self, labels: Arc<Labels>) -> u32 {
        let i = self.labels.len() as u32;
        for (k, v) in labels.iter() {
            let postings = match self.by_key.get_mut(k.as_str()) {
                Some(p) => p,
                None => self.by_key.entry(k.clone()).or_default(),
            };
            postings.any.push(i);
            match postings.by_value.get_mut(v.as_str()) {
                Some(list) => list.push(i),
                None => {
                    postings.by_value.insert(v.clone(), vec![i]);
                }
            }
        }
        self.labels.push(labels);
        i
    }

    fn pair(&self, k: &str, v: &str) -> Option<&Vec<u32>> {
        self.by_key.get(k).and_then(|p| p.by_value.get(v))
    }

    fn key(&self, k: &str) -> Option<&Vec<u32>> {
        self.by_key.get(k).map(|p| &p.any)
    }

    /// Number of objects in the universe.
    pub(crate) fn len(&self) -> usize {
        self.labels.len()
    }

    /// The labels of object `i`.
    pub(crate) fn labels(&self, i: u32) -> Option<&Labels> {
        self.labels.get(i as usize).map(|l| &**l)
    }

    /// Roughly how many label-set matches `select` costs for `sel`, for planners.
    pub(crate) fn estimate(&self, sel: &LabelSelector) -> usize {
        match self.candidates(sel) {
            // Only negative terms: set operations on posting lists, no label matching.
            Candidates::All => self.len() / 16,
            Candidates::Lists(lists) => lists.iter().map(|l| l.len()).sum(),
        }
    }

    /// The objects `sel` selects, in increasing order.
    pub(crate) fn select(&self, sel: &LabelSelector) -> Vec<u32> {
        match self.candidates(sel) {
            Candidates::All => self.select_negative(sel),
            Candidates::Lists(lists) => {
                let mut out: Vec<u32> = lists
                    .iter()
                    .flat_map(|l| l.iter().copied())
                    .filter(|&i| self.matches(sel, i))
                    .collect();
                if lists.len() > 1 {
                    out.sort_unstable();
                }
                out
            }
        }
    }

    /// `select` for a selector with no positive term: every term is `NotIn` or
    /// `DoesNotExist` (or there are none), so the answer is exactly the objects outside the
    /// union of the posting lists those terms name, and no labels need matching.
    fn select_negative(&self, sel: &LabelSelector) -> Vec<u32> {
        let mut excluded = vec![false; self.labels.len()];
        let mut exclude = |list: Option<&Vec<u32>>| {
            for &i in list.map_or(&[][..], Vec::as_slice) {
                if let Some(e) = excluded.get_mut(i as usize) {
                    *e = true;
                }
            }
        };
        for r in &sel.match_expressions {
            match r.operator {
                Operator::NotIn => {
                    for v in &r.values {
                        exclude(self.pair(&r.key, v));
                    }
                }
                Operator::DoesNotExist => exclude(self.key(&r.key)),
                // `candidates` found no positive term; keep the general path just in case.
                Operator::In | Operator::Exists => {
                    return (0..self.labels.len() as u32)
                        .filter(|&i| self.matches(sel, i))
                        .collect();
                }
            }
        }
        excluded
            .iter()
            .enumerate()
            .filter(|(_, e)| !**e)
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Whether `sel` selects object `i`.
    pub(crate) fn matches(&self, sel: &LabelSelector, i: u32) -> bool {
        self.labels(i).is_some_and(|l| sel.matches(l))
    }

    /// The smallest candidate superset any single positive term of `sel` implies.
    fn candidates<'s>(&'s self, sel: &'s LabelSelector) -> Candidates<'s> {
        const NONE: &[u32] = &[];
        fn offer<'i>(best: &mut Option<(usize, Vec<&'i [u32]>)>, lists: Vec<&'i [u32]>) {
            let size: usize = lists.iter().map(|l| l.len()).sum();
            if best.as_ref().is_none_or(|(s, _)| size < *s) {
                *best = Some((size, lists));
            }
        }
        let mut best: Option<(usize, Vec<&[u32]>)> = None;
        for (k, v) in &sel.match_labels {
            let list = self.pair(k, v);
            offer(&mut best, vec![list.map_or(NONE, |l| l.as_slice())]);
        }
        for r in &sel.match_expressions {
            match r.operator {
                Operator::In => {
                    // Duplicate values would list the same objects twice.
                    let mut values: Vec<&str> = r.values.iter().map(String::as_str).collect();
                    values.sort_unstable();
                    values.dedup();
                    offer(
                        &mut best,
                        values
                            .iter()
                            .map(|v| self.pair(&r.key, v).map_or(NONE, |l| l.as_slice()))
                            .collect(),
                    );
                }
                Operator::Exists => {
                    let list = self.key(&r.key);
                    offer(&mut best, vec![list.map_or(NONE, |l| l.as_slice())]);
                }
                Operator::NotIn | Operator::DoesNotExist => {}
            }
        }
        match best {
            Some((_, lists)) => Candidates::Lists(lists),
            None => Candidates::All,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::policy::model::Requirement;

    fn labels(s: &str) -> Labels {
        s.split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    fn sel(pairs: &str, exprs: &[(&str, Operator, &[&str])]) -> LabelSelector {
        LabelSelector {
            match_labels: labels(pairs).into_iter().collect::<BTreeMap<_, _>>(),
            match_expressions: exprs
                .iter()
                .map(|(k, op, vs)| Requirement {
                    key: k.to_string(),
                    operator: *op,
                    values: vs.iter().map(|v| v.to_string()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn select_agrees_with_matches() {
        let universe: Vec<Labels> = [
            "app=web,tier=fe",
            "app=web,tier=be",
            "app=db",
            "",
            "tier=fe",
            "app=cache,tier=be",
        ]
        .iter()
        .map(|s| labels(s))
        .collect();
        let index = LabelIndex::new(universe.iter().cloned().map(Arc::new).collect());
        let check = |s: LabelSelector, expected: &[u32]| {
            let got = index.select(&s);
            let model: Vec<u32> = (0..universe.len() as u32)
                .filter(|&i| s.matches(&universe[i as usize]))
                .collect();
            assert_eq!(got, model, "{s:?}");
            assert_eq!(got, expected, "{s:?}");
        };
        check(sel("", &[]), &[0, 1, 2, 3, 4, 5]);
        check(sel("app=web", &[]), &[0, 1]);
        check(sel("app=web,tier=be", &[]), &[1]);
        check(sel("app=nope", &[]), &[]);
        check(
            sel("", &[("app", Operator::In, &["db", "cache", "db"])]),
            &[2, 5],
        );
        check(
            sel("", &[("app", Operator::NotIn, &["web"])]),
            &[2, 3, 4, 5],
        );
        check(sel("", &[("tier", Operator::Exists, &[])]), &[0, 1, 4, 5]);
        check(sel("", &[("tier", Operator::DoesNotExist, &[])]), &[2, 3]);
        check(
            sel("tier=be", &[("app", Operator::In, &["web", "cache"])]),
            &[1, 5],
        );
        check(sel("", &[("app", Operator::In, &[])]), &[]);
    }

    fn arb_labels() -> impl proptest::strategy::Strategy<Value = Labels> {
        use proptest::prelude::*;
        prop::collection::btree_map(
            prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_string),
            prop::sample::select(vec!["x", "y"]).prop_map(str::to_string),
            0..=3,
        )
    }

    fn arb_selector() -> impl proptest::strategy::Strategy<Value = LabelSelector> {
        use proptest::prelude::*;
        let op = prop::sample::select(vec![
            Operator::In,
            Operator::NotIn,
            Operator::Exists,
            Operator::DoesNotExist,
        ]);
        let req = (
            prop::sample::select(vec!["a", "b", "c"]),
            op,
            prop::collection::vec(prop::sample::select(vec!["x", "y", "z"]), 0..=3),
        )
            .prop_map(|(key, operator, values)| Requirement {
                key: key.into(),
                operator,
                values: values.into_iter().map(str::to_string).collect(),
            });
        (arb_labels(), prop::collection::vec(req, 0..=2)).prop_map(
            |(match_labels, match_expressions)| LabelSelector {
                match_labels,
                match_expressions,
            },
        )
    }

    proptest::proptest! {
        #[test]
        fn select_is_a_filter_with_matches(
            universe in proptest::collection::vec(arb_labels(), 0..12),
            s in arb_selector(),
        ) {
            let index = LabelIndex::new(universe.iter().cloned().map(Arc::new).collect());
            let model: Vec<u32> = (0..universe.len() as u32)
                .filter(|&i| s.matches(&universe[i as usize]))
                .collect();
            proptest::prop_assert_eq!(index.select(&s), model);
        }
    }
}
