//! PBX event feeds (Asterisk AMI, FreeSWITCH ESL) → call events; the wire
//! parsing here is pure, the connection loops come with issue 5.

pub mod ami;
pub mod esl;
