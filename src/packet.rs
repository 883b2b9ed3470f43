//! The TFTP wire format: RRQ, WRQ, DATA, ACK, ERROR and OACK (RFC 1350, RFC 2347).
//!
//! [`Packet::parse`] turns a datagram into a borrowed view in one checked step. It never
//! allocates and never panics, whatever the input. A request (RRQ, WRQ) longer than
//! [`MAX_REQUEST_LEN`] is refused ([`ParseError::RequestTooLong`]): RFC 2347 caps requests at
//! 512 bytes, and the cap is twice that for odd firmware. Unknown error codes stay
//! representable as [`ErrorCode::Unknown`].
//!
//! Encoding goes the other way: [`Packet::encode`] appends a packet to a `Vec<u8>`, and the
//! `write_*` helpers build the packets the server sends on its hot path without any
//! intermediate value. The client's packets (RRQ, ACK) are written by
//! [`client`](crate::client).

use std::fmt;

/// Largest UDP payload a TFTP packet can have (65,535 bytes minus the IP and UDP headers is
/// smaller, but a datagram buffer of this size holds any packet).
pub const MAX_DATAGRAM: usize = 65_535;

/// Longest request (RRQ or WRQ datagram) parsed; longer ones are
/// [`ParseError::RequestTooLong`]. RFC 2347 says "the maximum size of a request packet is
/// 512 octets"; real clients stay far below it (a DHCP boot file name is at most 255 bytes,
/// and firmware asks for at most five options, about 60 bytes). Twice the RFC's limit leaves
/// room for odd firmware (requests padded with NULs, long paths) while a spoofable request
/// can no longer carry 65 KB of junk options.
pub const MAX_REQUEST_LEN: usize = 1024;

/// Size of the DATA header (opcode and block number) in front of the payload.
pub const DATA_HEADER_LEN: usize = 4;

/// The opcode, the first two bytes of every packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// Read request (1).
    Rrq,
    /// Write request (2).
    Wrq,
    /// Data block (3).
    Data,
    /// Acknowledgement (4).
    Ack,
    /// Error (5).
    Error,
    /// Option acknowledgement (6, RFC 2347).
    Oack,
}

impl Opcode {
    /// The opcode for a wire value, if it is one of the six.
    pub fn from_u16(value: u16) -> Option<Opcode> {
        Some(match value {
            1 => Opcode::Rrq,
            2 => Opcode::Wrq,
            3 => Opcode::Data,
            4 => Opcode::Ack,
            5 => Opcode::Error,
            6 => Opcode::Oack,
            _ => return None,
        })
    }

    /// The wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            Opcode::Rrq => 1,
            Opcode::Wrq => 2,
            Opcode::Data => 3,
            Opcode::Ack => 4,
            Opcode::Error => 5,
            Opcode::Oack => 6,
        }
    }
}

/// A TFTP error code (RFC 1350 §5, RFC 2347). Codes outside 0..=8 are kept as `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 0: not defined, see the message.
    NotDefined,
    /// 1: file not found.
    FileNotFound,
    /// 2: access violation.
    AccessViolation,
    /// 3: disk full or allocation exceeded.
    DiskFull,
    /// 4: illegal TFTP operation.
    IllegalOperation,
    /// 5: unknown transfer ID.
    UnknownTransferId,
    /// 6: file already exists.
    FileExists,
    /// 7: no such user.
    NoSuchUser,
    /// 8: option negotiation refused (RFC 2347).
    OptionNegotiation,
    /// Any other value.
    Unknown(u16),
}

impl ErrorCode {
    /// The code for a wire value.
    pub fn from_u16(value: u16) -> ErrorCode {
        match value {
            0 => ErrorCode::NotDefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTransferId,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionNegotiation,
            other => ErrorCode::Unknown(other),
        }
    }

    /// The wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTransferId => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionNegotiation => 8,
            ErrorCode::Unknown(other) => other,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            ErrorCode::NotDefined => "not defined",
            ErrorCode::FileNotFound => "file not found",
            ErrorCode::AccessViolation => "access violation",
            ErrorCode::DiskFull => "disk full",
            ErrorCode::IllegalOperation => "illegal operation",
            ErrorCode::UnknownTransferId => "unknown transfer id",
            ErrorCode::FileExists => "file exists",
            ErrorCode::NoSuchUser => "no such user",
            ErrorCode::OptionNegotiation => "option negotiation",
            ErrorCode::Unknown(code) => return write!(f, "error code {code}"),
        };
        write!(f, "{} ({})", self.to_u16(), text)
    }
}

/// The transfer mode of a request. Names are case-insensitive on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// `octet`: bytes as they are.
    Octet,
    /// `netascii`: LF becomes CR LF and a bare CR becomes CR NUL.
    Netascii,
    /// `mail`: obsolete (RFC 1350), never served.
    Mail,
}

impl Mode {
    /// The mode named by `name`, compared case-insensitively; `None` for unknown names.
    pub fn from_bytes(name: &[u8]) -> Option<Mode> {
        if name.eq_ignore_ascii_case(b"octet") {
            Some(Mode::Octet)
        } else if name.eq_ignore_ascii_case(b"netascii") {
            Some(Mode::Netascii)
        } else if name.eq_ignore_ascii_case(b"mail") {
            Some(Mode::Mail)
        } else {
            None
        }
    }

    /// The canonical lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Octet => "octet",
            Mode::Netascii => "netascii",
            Mode::Mail => "mail",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What was wrong with a datagram that did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParseError {
    /// Shorter than the fixed part of its packet type (2 bytes for the opcode, 4 for
    /// DATA, ACK and ERROR).
    Truncated,
    /// The opcode is not one of the six TFTP opcodes.
    UnknownOpcode(u16),
    /// A string field (filename, mode, option name or value) has no terminating NUL.
    MissingTerminator,
    /// The request's filename is empty.
    EmptyFilename,
    /// The request's mode is empty.
    EmptyMode,
    /// An option name is followed by no value at all.
    DanglingOption,
    /// An option name is empty while more bytes follow.
    EmptyOptionName,
    /// Bytes follow the end of a packet that has a fixed length (ACK).
    TrailingBytes,
    /// The datagram is larger than any UDP payload.
    TooLong,
    /// A request (RRQ or WRQ) longer than [`MAX_REQUEST_LEN`] bytes.
    RequestTooLong,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Truncated => f.write_str("packet truncated"),
            ParseError::UnknownOpcode(op) => write!(f, "unknown opcode {op}"),
            ParseError::MissingTerminator => f.write_str("string field not NUL-terminated"),
            ParseError::EmptyFilename => f.write_str("empty filename"),
            ParseError::EmptyMode => f.write_str("empty mode"),
            ParseError::DanglingOption => f.write_str("option name without a value"),
            ParseError::EmptyOptionName => f.write_str("empty option name"),
            ParseError::TrailingBytes => f.write_str("trailing bytes after the packet"),
            ParseError::TooLong => f.write_str("datagram longer than 65535 bytes"),
            ParseError::RequestTooLong => f.write_str("request too long"),
        }
    }
}

impl std::error::Error for ParseError {}

/// A parsed packet, borrowing from the datagram it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Read request.
    Rrq(Request<'a>),
    /// Write request (parsed so that it can be refused precisely).
    Wrq(Request<'a>),
    /// A data block.
    Data {
        /// Block number (wraps 65535 → 0).
        block: u16,
        /// The payload, 0..=blksize bytes.
        data: &'a [u8],
    },
    /// Acknowledgement of a block.
    Ack {
        /// The acknowledged block number.
        block: u16,
    },
    /// An error, which ends the transfer.
    Error {
        /// The error code.
        code: ErrorCode,
        /// The message, without its NUL terminator; may be empty or not UTF-8.
        message: &'a [u8],
    },
    /// Option acknowledgement.
    Oack(Options<'a>),
}

/// A read or write request: filename, mode and options, all borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// The filename bytes as sent: non-empty, no NUL, not necessarily UTF-8.
    pub filename: &'a [u8],
    /// The mode name bytes as sent (see [`Request::mode`]).
    pub mode_name: &'a [u8],
    /// The requested options (RFC 2347).
    pub options: Options<'a>,
}

impl<'a> Request<'a> {
    /// The transfer mode, or `None` when the mode name is not `octet`, `netascii` or `mail`.
    pub fn mode(&self) -> Option<Mode> {
        Mode::from_bytes(self.mode_name)
    }
}

/// A validated list of `name NUL value NUL` pairs. Iterating yields [`TftpOption`]s in
/// wire order; names keep their case (compare with [`TftpOption::is`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Options<'a> {
    raw: &'a [u8],
}

impl<'a> Options<'a> {
    /// No options at all.
    pub const EMPTY: Options<'static> = Options { raw: b"" };

    /// Checks `raw` as a sequence of `name NUL value NUL` pairs. Trailing NUL padding after
    /// the last complete pair is accepted (some PXE ROMs pad their requests) and dropped.
    pub fn parse(raw: &'a [u8]) -> Result<Options<'a>, ParseError> {
        let mut rest = raw;
        let mut end = 0;
        while !rest.is_empty() {
            if rest.iter().all(|&b| b == 0) {
                break;
            }
            let (name, after_name) = split_cstr(rest)?;
            if name.is_empty() {
                return Err(ParseError::EmptyOptionName);
            }
            if after_name.is_empty() {
                return Err(ParseError::DanglingOption);
            }
            let (_value, after_value) = split_cstr(after_name)?;
            end += rest.len() - after_value.len();
            rest = after_value;
        }
        Ok(Options { raw: &raw[..end] })
    }

    /// True when there are no options.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Number of options.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// The options in wire order.
    pub fn iter(&self) -> OptionsIter<'a> {
        OptionsIter { rest: self.raw }
    }

    /// The raw `name NUL value NUL …` bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.raw
    }
}

impl fmt::Debug for Options<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> IntoIterator for Options<'a> {
    type Item = TftpOption<'a>;
    type IntoIter = OptionsIter<'a>;
    fn into_iter(self) -> OptionsIter<'a> {
        self.iter()
    }
}

/// Iterator over validated options.
#[derive(Clone, Debug)]
pub struct OptionsIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for OptionsIter<'a> {
    type Item = TftpOption<'a>;

    fn next(&mut self) -> Option<TftpOption<'a>> {
        // The bytes were validated by `Options::parse`, so both splits succeed; a failure
        // here simply ends the iteration rather than panicking.
        let (name, rest) = split_cstr(self.rest).ok()?;
        let (value, rest) = split_cstr(rest).ok()?;
        self.rest = rest;
        Some(TftpOption { name, value })
    }
}

/// One option: name and value bytes as sent.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TftpOption<'a> {
    /// The option name as sent (compare case-insensitively).
    pub name: &'a [u8],
    /// The option value as sent.
    pub value: &'a [u8],
}

impl TftpOption<'_> {
    /// True when the option's name equals `name`, ignoring ASCII case.
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }
}

impl fmt::Debug for TftpOption<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={}",
            String::from_utf8_lossy(self.name),
            String::from_utf8_lossy(self.value)
        )
    }
}

/// Splits `bytes` at its first NUL: the string before it and the bytes after it.
fn split_cstr(bytes: &[u8]) -> Result<(&[u8], &[u8]), ParseError> {
    let nul = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or(ParseError::MissingTerminator)?;
    let (text, rest) = bytes.split_at(nul);
    Ok((text, rest.get(1..).unwrap_or_default()))
}

fn split_u16(bytes: &[u8]) -> Result<(u16, &[u8]), ParseError> {
    match bytes {
        [hi, lo, rest @ ..] => Ok((u16::from_be_bytes([*hi, *lo]), rest)),
        _ => Err(ParseError::Truncated),
    }
}

impl<'a> Packet<'a> {
    /// Parses one datagram. Never panics and never allocates.
    pub fn parse(datagram: &'a [u8]) -> Result<Packet<'a>, ParseError> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(ParseError::TooLong);
        }
        let (op, body) = split_u16(datagram)?;
        let opcode = Opcode::from_u16(op).ok_or(ParseError::UnknownOpcode(op))?;
        if matches!(opcode, Opcode::Rrq | Opcode::Wrq) && datagram.len() > MAX_REQUEST_LEN {
            return Err(ParseError::RequestTooLong);
        }
        Ok(match opcode {
            Opcode::Rrq => Packet::Rrq(parse_request(body)?),
            Opcode::Wrq => Packet::Wrq(parse_request(body)?),
            Opcode::Data => {
                let (block, data) = split_u16(body)?;
                Packet::Data { block, data }
            }
            Opcode::Ack => {
                let (block, rest) = split_u16(body)?;
                if !rest.is_empty() {
                    return Err(ParseError::TrailingBytes);
                }
                Packet::Ack { block }
            }
            Opcode::Error => {
                let (code, rest) = split_u16(body)?;
                // Lenient on purpose: the message ends at the first NUL or at the end of
                // the datagram, and anything after the NUL is ignored. An ERROR must end
                // the transfer even from a client that formats it sloppily.
                let message = match rest.iter().position(|&b| b == 0) {
                    Some(nul) => &rest[..nul],
                    None => rest,
                };
                Packet::Error {
                    code: ErrorCode::from_u16(code),
                    message,
                }
            }
            Opcode::Oack => Packet::Oack(Options::parse(body)?),
        })
    }

    /// The packet's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Packet::Rrq(_) => Opcode::Rrq,
            Packet::Wrq(_) => Opcode::Wrq,
            Packet::Data { .. } => Opcode::Data,
            Packet::Ack { .. } => Opcode::Ack,
            Packet::Error { .. } => Opcode::Error,
            Packet::Oack(_) => Opcode::Oack,
        }
    }

    /// Appends the packet's wire form to `out`. A message containing NUL is cut at the NUL
    /// so that the result always parses back to the same packet.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.opcode().to_u16().to_be_bytes());
        match self {
            Packet::Rrq(req) | Packet::Wrq(req) => {
                push_cstr(out, req.filename);
                push_cstr(out, req.mode_name);
                out.extend_from_slice(req.options.as_bytes());
            }
            Packet::Data { block, data } => {
                out.extend_from_slice(&block.to_be_bytes());
                out.extend_from_slice(data);
            }
            Packet::Ack { block } => out.extend_from_slice(&block.to_be_bytes()),
            Packet::Error { code, message } => {
                out.extend_from_slice(&code.to_u16().to_be_bytes());
                push_cstr(out, message);
            }
            Packet::Oack(options) => out.extend_from_slice(options.as_bytes()),
        }
    }
}

fn parse_request(body: &[u8]) -> Result<Request<'_>, ParseError> {
    let (filename, rest) = split_cstr(body)?;
    if filename.is_empty() {
        return Err(ParseError::EmptyFilename);
    }
    let (mode_name, rest) = split_cstr(rest)?;
    if mode_name.is_empty() {
        return Err(ParseError::EmptyMode);
    }
    Ok(Request {
        filename,
        mode_name,
        options: Options::parse(rest)?,
    })
}

/// Appends `text` up to its first NUL, then a NUL.
pub(crate) fn push_cstr(out: &mut Vec<u8>, text: &[u8]) {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    out.extend_from_slice(&text[..end]);
    out.push(0);
}

/// Writes a DATA header for `block` into the first four bytes of `buf`.
///
/// The session reads the payload straight into `buf[DATA_HEADER_LEN..]`, so a DATA packet
/// is built without copying. Returns `None` when `buf` is shorter than the header.
pub fn write_data_header(buf: &mut [u8], block: u16) -> Option<()> {
    let header = buf.get_mut(..DATA_HEADER_LEN)?;
    header[..2].copy_from_slice(&Opcode::Data.to_u16().to_be_bytes());
    header[2..].copy_from_slice(&block.to_be_bytes());
    Some(())
}

/// Appends an ERROR packet to `out`; a NUL inside `message` cuts it short.
pub fn write_error(out: &mut Vec<u8>, code: ErrorCode, message: &str) {
    Packet::Error {
        code,
        message: message.as_bytes(),
    }
    .encode(out);
}

/// Appends an OACK carrying `options` (name, value) in the given order to `out`.
pub fn write_oack<'o, I>(out: &mut Vec<u8>, options: I)
where
    I: IntoIterator<Item = (&'o str, &'o str)>,
{
    out.extend_from_slice(&Opcode::Oack.to_u16().to_be_bytes());
    for (name, value) in options {
        push_cstr(out, name.as_bytes());
        push_cstr(out, value.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(bytes: &[u8]) -> Packet<'_> {
        let packet = Packet::parse(bytes).expect("parses");
        let mut out = Vec::new();
        packet.encode(&mut out);
        assert_eq!(out, bytes, "encode reproduces the canonical datagram");
        packet
    }

    #[test]
    fn parses_rrq_with_options_case_insensitively() {
        let bytes = b"\x00\x01boot/pxelinux.0\x00OcTeT\x00BLKSIZE\x001428\x00tsize\x000\x00";
        let Packet::Rrq(req) = roundtrip(bytes) else {
            panic!("not an RRQ")
        };
        assert_eq!(req.filename, b"boot/pxelinux.0");
        assert_eq!(req.mode(), Some(Mode::Octet));
        let opts: Vec<_> = req.options.iter().collect();
        assert_eq!(opts.len(), 2);
        assert!(opts[0].is("blksize"));
        assert_eq!(opts[0].value, b"1428");
        assert!(opts[1].is("TSIZE"));
        assert_eq!(req.options.len(), 2);
    }

    #[test]
    fn modes() {
        assert_eq!(Mode::from_bytes(b"NETASCII"), Some(Mode::Netascii));
        assert_eq!(Mode::from_bytes(b"mail"), Some(Mode::Mail));
        assert_eq!(Mode::from_bytes(b"binary"), None);
    }

    #[test]
    fn requests_up_to_the_cap_are_parsed_whole_and_longer_ones_refused() {
        // 600 bytes: over RFC 2347's 512, within the lenient cap, not truncated.
        let mut bytes = b"\x00\x01".to_vec();
        bytes.extend(std::iter::repeat_n(b'a', 600));
        bytes.extend_from_slice(b"\x00octet\x00timeout\x003\x00");
        let Packet::Rrq(req) = Packet::parse(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(req.filename.len(), 600);
        assert_eq!(req.options.iter().next().unwrap().value, b"3");
        // Exactly the cap: parsed; one byte more (NUL padding included): refused.
        let mut at_cap = b"\x00\x01f\x00octet\x00".to_vec();
        at_cap.resize(MAX_REQUEST_LEN, 0);
        assert!(matches!(Packet::parse(&at_cap), Ok(Packet::Rrq(_))));
        at_cap.push(0);
        assert_eq!(Packet::parse(&at_cap), Err(ParseError::RequestTooLong));
        at_cap[1] = 2;
        assert_eq!(Packet::parse(&at_cap), Err(ParseError::RequestTooLong));
        // Only requests are capped: a large DATA or ERROR still parses.
        let mut data = b"\x00\x03\x00\x01".to_vec();
        data.resize(4 + 8192, 7);
        assert!(matches!(Packet::parse(&data), Ok(Packet::Data { .. })));
        // The refusal's text is short: an ERROR quoting it is far smaller than the request.
        assert!(ParseError::RequestTooLong.to_string().len() < 20);
    }

    #[test]
    fn trailing_nul_padding_after_options_is_accepted() {
        let Packet::Rrq(req) = Packet::parse(b"\x00\x01f\x00octet\x00\x00\x00\x00").unwrap() else {
            panic!()
        };
        assert!(req.options.is_empty());
        let Packet::Rrq(req) = Packet::parse(b"\x00\x01f\x00octet\x00a\x00b\x00\x00").unwrap()
        else {
            panic!()
        };
        assert_eq!(req.options.len(), 1);
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        let cases: &[(&[u8], ParseError)] = &[
            (b"", ParseError::Truncated),
            (b"\x00", ParseError::Truncated),
            (b"\x00\x09", ParseError::UnknownOpcode(9)),
            (b"\x00\x01", ParseError::MissingTerminator),
            (b"\x00\x01file", ParseError::MissingTerminator),
            (b"\x00\x01file\x00octet", ParseError::MissingTerminator),
            (b"\x00\x01\x00octet\x00", ParseError::EmptyFilename),
            (b"\x00\x01f\x00\x00", ParseError::EmptyMode),
            (
                b"\x00\x01f\x00octet\x00blksize\x00",
                ParseError::DanglingOption,
            ),
            (
                b"\x00\x01f\x00octet\x00blksize",
                ParseError::MissingTerminator,
            ),
            (
                b"\x00\x01f\x00octet\x00blksize\x00512",
                ParseError::MissingTerminator,
            ),
            (
                b"\x00\x01f\x00octet\x00\x00x\x00",
                ParseError::EmptyOptionName,
            ),
            (b"\x00\x04\x00", ParseError::Truncated),
            (b"\x00\x04\x00\x01\x00", ParseError::TrailingBytes),
            (b"\x00\x03\x00", ParseError::Truncated),
            (b"\x00\x05\x00", ParseError::Truncated),
            (b"\x00\x06a\x00", ParseError::DanglingOption),
        ];
        for (bytes, want) in cases {
            assert_eq!(Packet::parse(bytes), Err(*want), "{bytes:?}");
        }
    }

    #[test]
    fn data_ack_error_oack() {
        assert_eq!(
            roundtrip(b"\x00\x03\xff\xffhello"),
            Packet::Data {
                block: 65535,
                data: b"hello"
            }
        );
        assert_eq!(
            roundtrip(b"\x00\x03\x00\x01"),
            Packet::Data {
                block: 1,
                data: b""
            }
        );
        assert_eq!(
            roundtrip(b"\x00\x04\x12\x34"),
            Packet::Ack { block: 0x1234 }
        );
        assert_eq!(
            roundtrip(b"\x00\x05\x00\x08tsize probe\x00"),
            Packet::Error {
                code: ErrorCode::OptionNegotiation,
                message: b"tsize probe"
            }
        );
        let Packet::Oack(opts) = roundtrip(b"\x00\x06blksize\x001428\x00") else {
            panic!()
        };
        assert_eq!(opts.len(), 1);
    }

    #[test]
    fn error_parsing_is_lenient_about_the_terminator() {
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x63no nul"),
            Ok(Packet::Error {
                code: ErrorCode::Unknown(99),
                message: b"no nul"
            })
        );
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x01msg\x00junk"),
            Ok(Packet::Error {
                code: ErrorCode::FileNotFound,
                message: b"msg"
            })
        );
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x00"),
            Ok(Packet::Error {
                code: ErrorCode::NotDefined,
                message: b""
            })
        );
    }

    #[test]
    fn error_codes_round_trip_including_unknown() {
        for v in 0..=20u16 {
            assert_eq!(ErrorCode::from_u16(v).to_u16(), v);
        }
        assert_eq!(ErrorCode::from_u16(0xffff), ErrorCode::Unknown(0xffff));
        assert_eq!(ErrorCode::FileNotFound.to_string(), "1 (file not found)");
    }

    #[test]
    fn writers_produce_parseable_packets() {
        let mut out = Vec::new();
        write_error(&mut out, ErrorCode::AccessViolation, "no\0way");
        assert_eq!(out, b"\x00\x05\x00\x02no\x00");
        out.clear();
        write_oack(&mut out, [("blksize", "1428"), ("tsize", "99")]);
        assert_eq!(out, b"\x00\x06blksize\x001428\x00tsize\x0099\x00");
        let mut buf = [0u8; 6];
        write_data_header(&mut buf, 258).unwrap();
        assert_eq!(&buf[..4], b"\x00\x03\x01\x02");
        assert!(write_data_header(&mut [0u8; 3], 1).is_none());
    }

    #[test]
    fn too_long_datagram_is_refused() {
        let big = vec![0u8; MAX_DATAGRAM + 1];
        assert_eq!(Packet::parse(&big), Err(ParseError::TooLong));
    }

    #[test]
    fn every_prefix_of_valid_packets_parses_or_errors_without_panic() {
        let packets: &[&[u8]] = &[
            b"\x00\x01file\x00octet\x00blksize\x001428\x00tsize\x000\x00",
            b"\x00\x05\x00\x01File not found\x00",
            b"\x00\x06windowsize\x0016\x00",
        ];
        for p in packets {
            for end in 0..=p.len() {
                let _ = Packet::parse(&p[..end]);
            }
        }
    }
}
