/// One raw feature value in the form it travels in between services: missing, text, an integer or a number.
///
/// Every typed value stands for exactly one text (`text`): an integer for its canonical decimal text ("42",
/// "-7"), a number for the text `String(x)` prints for it ("87433.0", "1e-05"). `parse` picks a typed form only
/// when the text is that canonical text, so converting text → value → text is lossless and a model encodes a
/// typed value to the same row as its text (`FeatureEncoder.row(field:value:)`).
public enum FeatureValue: Sendable, Hashable {
    /// No value (the text "").
    case missing
    /// Any other text, as the feature files hold it.
    case text(String)
    /// An integer: stands for its canonical decimal text.
    case integer(Int64)
    /// A finite number, never -0.0 (whose text would be "-0.0" but which compares equal to 0.0): stands for
    /// `String(x)`.
    case number(Double)

    /// The narrowest exact form of `text`: missing for "", an integer for canonical integer text, a number for
    /// the shortest text of a finite double, text otherwise.
    public static func parse(_ text: String) -> FeatureValue {
        if text.isEmpty { return .missing }
        if let v = canonicalInteger(text) { return .integer(v) }
        if let x = canonicalNumber(text) { return .number(x) }
        return .text(text)
    }

    /// The integer whose canonical text `text` is, or nil.
    public static func canonicalInteger(_ text: String) -> Int64? {
        guard let v = Int64(text), String(v) == text else { return nil }
        return v
    }

    /// The finite double (not -0.0) whose `String(x)` is `text`, or nil.
    public static func canonicalNumber(_ text: String) -> Double? {
        guard let x = Double(text), isRepresentable(x), String(x) == text else { return nil }
        return x
    }

    /// True for a number `FeatureValue` may hold (finite, not -0.0).
    public static func isRepresentable(_ x: Double) -> Bool {
        x.isFinite && !(x == 0 && x.sign == .minus)
    }

    /// The text this value stands for ("" when missing).
    public var text: String {
        switch self {
        case .missing: return ""
        case .text(let s): return s
        case .integer(let v): return String(v)
        case .number(let x): return String(x)
        }
    }
}

extension FeatureHash {
    /// FNV-1a of the canonical decimal text of `v` (the same as hashing `String(v).utf8`), without making it.
    @inlinable
    public static func fnv1a64(integer v: Int64) -> UInt64 {
        var h = offsetBasis
        feed(integer: v, into: &h)
        return h
    }

    /// Feeds the canonical decimal text of `v` into a running FNV-1a hash (the bytes of `String(v).utf8`).
    @inlinable
    public static func feed(integer v: Int64, into h: inout UInt64) {
        if v < 0 { feed(byte: UInt64(UInt8(ascii: "-")), into: &h) }
        // Digits least significant first into a buffer (at most 20 for a UInt64), then fed in text order.
        var digits: (UInt64, UInt64, UInt64) = (0, 0, 0)   // 24 bytes
        var count = 0
        var magnitude = v.magnitude
        withUnsafeMutableBytes(of: &digits) { buffer in
            repeat {
                buffer[count] = UInt8(ascii: "0") &+ UInt8(magnitude % 10)
                magnitude /= 10
                count += 1
            } while magnitude > 0
            for i in stride(from: count - 1, through: 0, by: -1) {
                feed(byte: UInt64(buffer[i]), into: &h)
            }
        }
    }
}
