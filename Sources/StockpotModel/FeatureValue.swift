/// One raw feature value in the form it travels in between services: missing, text, an integer or a number.
///
/// Every typed value stands for exactly one text (`text`): an integer for its canonical decimal text ("42",
/// "-7"), a number for the text `String(x)` prints for it ("87433.0", "1e-05"). `parse` picks a typed form only
/// when the text is that canonical text, so converting text → value → text is lossless and a model encodes a
/// typed value to the same row as its text (`FeatureEncoder.row(field:value:)`).
public enum FeatureValue: Sendable, Hashable {
    case missing
    case text(String)
    case integer(Int64)
    /// Finite, never -0.0 (whose text would be "-0.0" but which compares equal to 0.0).
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
        guard let x = Double(text), x.isFinite, !(x == 0 && x.sign == .minus), String(x) == text else { return nil }
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

    public var isMissing: Bool {
        switch self {
        case .missing: return true
        case .text(let s): return s.isEmpty
        default: return false
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

    /// Feeds the canonical decimal text of `v` into a running FNV-1a hash.
    @inlinable
    public static func feed(integer v: Int64, into h: inout UInt64) {
        if v < 0 { h = (h ^ UInt64(UInt8(ascii: "-"))) &* prime }
        var magnitude = v.magnitude
        // Digits, most significant first: at most 20 for a UInt64.
        var divisor: UInt64 = 1
        while magnitude / divisor >= 10 { divisor &*= 10 }
        while true {
            let digit = magnitude / divisor
            h = (h ^ UInt64(UInt8(ascii: "0") &+ UInt8(digit))) &* prime
            magnitude -= digit &* divisor
            if divisor == 1 { break }
            divisor /= 10
        }
    }
}
