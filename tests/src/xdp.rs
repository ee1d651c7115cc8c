//! Stand-ins shared by the AF_XDP tests.

use classifier::{DropReason, PortId, Verdict};
use dataplane::worker::Classify;

/// Forwards port 0 ↔ port 1, writing the egress link's MACs, as the classifier's rewrite
/// stage will: the worker loop's own cost, without classification.
#[derive(Debug, Clone, Copy)]
pub struct CrossConnect {
    /// (destination, source) MACs for frames leaving by port 0 and by port 1.
    pub macs: [([u8; 6], [u8; 6]); 2],
}

impl Classify for CrossConnect {
    fn classify_burst(
        &mut self,
        frames: &mut [&mut [u8]],
        ingress: PortId,
        verdicts: &mut [Verdict],
    ) {
        let egress = 1 - ingress.0.min(1);
        let (dst, src) = self.macs[usize::from(egress)];
        for (frame, verdict) in frames.iter_mut().zip(verdicts.iter_mut()) {
            *verdict = if frame.len() >= 14 {
                frame[..6].copy_from_slice(&dst);
                frame[6..12].copy_from_slice(&src);
                Verdict::Forward(PortId(egress))
            } else {
                Verdict::Drop(DropReason::Truncated)
            };
        }
    }
}
