//! Communication between ranks: transports, collectives, and how frames are laid out.

pub mod collective;
pub mod expert;
pub mod tcp;
pub mod transport;
pub mod wire;
