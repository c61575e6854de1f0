/// Turns raw feature values into embedding row indices, exactly as `model.json` specifies.
///
/// Built once per model and shared read-only; encoding a value allocates nothing.
public struct FeatureEncoder: Sendable {
    /// Per-field lookup state, in the model's field order.
    public let fields: [FieldSpec]
    private let vocabularies: [[String: Int32]?]
    private let missing: [Set<String>]
    /// The same vocabularies and missing markers keyed by the typed values their texts stand for
    /// (`FeatureValue.parse`), so a typed value finds the row its text would.
    private let integerVocabularies: [[Int64: Int32]]
    private let numberVocabularies: [[Double: Int32]]
    private let missingIntegers: [Set<Int64>]
    private let missingNumbers: [Set<Double>]

    public init(fields: [FieldSpec]) {
        self.fields = fields
        vocabularies = fields.map { field in
            guard case .vocabulary(let values) = field.encoding else { return nil }
            var map = [String: Int32](minimumCapacity: values.count)
            for (i, v) in values.enumerated() where map[v] == nil { map[v] = Int32(i + 1) }
            return map
        }
        missing = fields.map { Set($0.missing) }
        var integerVocabularies: [[Int64: Int32]] = [], numberVocabularies: [[Double: Int32]] = []
        for field in fields {
            var ints: [Int64: Int32] = [:], numbers: [Double: Int32] = [:]
            if case .vocabulary(let values) = field.encoding {
                // First occurrence wins, as in the text map: one canonical text per typed value.
                for (i, v) in values.enumerated() {
                    switch FeatureValue.parse(v) {
                    case .integer(let k) where ints[k] == nil: ints[k] = Int32(i + 1)
                    case .number(let x) where numbers[x] == nil: numbers[x] = Int32(i + 1)
                    default: break
                    }
                }
            }
            integerVocabularies.append(ints)
            numberVocabularies.append(numbers)
        }
        self.integerVocabularies = integerVocabularies
        self.numberVocabularies = numberVocabularies
        missingIntegers = fields.map { Set($0.missing.compactMap(FeatureValue.canonicalInteger)) }
        missingNumbers = fields.map { Set($0.missing.compactMap(FeatureValue.canonicalNumber)) }
    }

    /// Row for a value in any form: the row its text (`FeatureValue.text`) gets from `row(field:raw:)`, found
    /// without making the text for integers, and for numbers in vocabulary and bucketised fields.
    public func row(field index: Int, value: FeatureValue) -> Int32 {
        switch value {
        case .missing:
            return 0
        case .text(let s):
            return rowImpl(field: index, raw: Substring(s))
        case .integer(let v):
            if !missingIntegers[index].isEmpty && missingIntegers[index].contains(v) { return 0 }
            switch fields[index].encoding {
            case .vocabulary: return integerVocabularies[index][v] ?? 0
            case .hashed(let buckets): return Int32(1 + Int(FeatureHash.fnv1a64(integer: v) % UInt64(buckets)))
            case .buckets(let boundaries): return Self.bucketRow(Double(v), boundaries: boundaries)
            }
        case .number(let x):
            // A number no typed column may hold (NaN, infinite, -0.0) stands for no canonical text: read its text.
            guard FeatureValue.isRepresentable(x) else { return rowImpl(field: index, raw: Substring(String(x))) }
            if !missingNumbers[index].isEmpty && missingNumbers[index].contains(x) { return 0 }
            switch fields[index].encoding {
            case .vocabulary: return numberVocabularies[index][x] ?? 0
            case .hashed: return rowImpl(field: index, raw: Substring(String(x)))
            case .buckets(let boundaries): return Self.bucketRow(x, boundaries: boundaries)
            }
        }
    }

    /// Row for a raw value given as text (the form every source provides).
    @inlinable
    public func row(field index: Int, raw: Substring) -> Int32 {
        rowImpl(field: index, raw: raw)
    }

    /// Row for a raw value given as text.
    public func row(field index: Int, raw: String) -> Int32 {
        rowImpl(field: index, raw: Substring(raw))
    }

    @usableFromInline
    func rowImpl(field index: Int, raw: Substring) -> Int32 {
        if raw.isEmpty { return 0 }
        if !missing[index].isEmpty && missing[index].contains(String(raw)) { return 0 }
        switch fields[index].encoding {
        case .vocabulary:
            return vocabularies[index]![String(raw)] ?? 0
        case .hashed(let buckets):
            return Int32(1 + Int(FeatureHash.fnv1a64(raw.utf8) % UInt64(buckets)))
        case .buckets(let boundaries):
            guard let x = Double(raw), x.isFinite else { return 0 }
            return Self.bucketRow(x, boundaries: boundaries)
        }
    }

    /// Row for a numeric value (NaN or infinite → missing row 0). Only valid for bucketised fields.
    public func row(field index: Int, numeric x: Double) -> Int32 {
        guard case .buckets(let boundaries) = fields[index].encoding else {
            return row(field: index, raw: Substring(String(x)))
        }
        guard x.isFinite else { return 0 }
        return Self.bucketRow(x, boundaries: boundaries)
    }

    /// `1 + #(boundaries ≤ x)` (Python: `1 + bisect.bisect_right(boundaries, x)`).
    @inlinable
    public static func bucketRow(_ x: Double, boundaries: [Double]) -> Int32 {
        var lo = 0
        var hi = boundaries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if boundaries[mid] <= x { lo = mid + 1 } else { hi = mid }
        }
        return Int32(1 + lo)
    }
}

/// The hash used by hashed fields. FNV-1a, 64-bit, over the value's UTF-8 bytes.
public enum FeatureHash {
    public static let offsetBasis: UInt64 = 0xcbf2_9ce4_8422_2325
    public static let prime: UInt64 = 0x0000_0100_0000_01b3

    @inlinable
    public static func fnv1a64<S: Sequence>(_ bytes: S) -> UInt64 where S.Element == UInt8 {
        var h = offsetBasis
        feed(bytes, into: &h)
        return h
    }

    /// Feeds one byte (or tag) into a running hash.
    @inlinable
    public static func feed(byte b: UInt64, into h: inout UInt64) {
        h = (h ^ b) &* prime
    }

    /// Feeds `bytes` into a running hash.
    @inlinable
    public static func feed<S: Sequence>(_ bytes: S, into h: inout UInt64) where S.Element == UInt8 {
        for b in bytes { h = (h ^ UInt64(b)) &* prime }
    }

    /// Feeds the 8 bytes of `bits`, least significant first, into a running hash.
    @inlinable
    public static func feed(bits: UInt64, into h: inout UInt64) {
        var b = bits
        for _ in 0..<8 {
            h = (h ^ (b & 0xFF)) &* prime
            b >>= 8
        }
    }
}
