//! Communication between ranks: what travels and how it is framed.

pub mod wire;
