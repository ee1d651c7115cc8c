//! SKELETON — the parser helper replaces this file.
use crate::parse::PacketMeta;
use crate::verdict::DropReason;
/// stub
pub fn set_macs(frame: &mut [u8], src: [u8; 6], dst: [u8; 6]) -> bool {
    let _ = (frame, src, dst);
    true
}
/// stub
pub fn decrement_ttl(frame: &mut [u8], meta: &PacketMeta) -> Result<(), DropReason> {
    let _ = (frame, meta);
    Ok(())
}
/// stub
pub fn arp_reply_in_place(frame: &mut [u8], meta: &PacketMeta, our_mac: [u8; 6]) -> bool {
    let _ = (frame, meta, our_mac);
    true
}
