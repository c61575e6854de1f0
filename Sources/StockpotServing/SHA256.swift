import Crypto
import Foundation

/// SHA-256 of registry artifacts, checked end to end (upload, store, download): swift-crypto's implementation
/// (BoringSSL on Linux, CryptoKit on Apple platforms) behind the small hex-digest API the registry uses.
public struct SHA256: Sendable {
    private var hasher = Crypto.SHA256()

    public init() {}

    public mutating func update<C: Collection>(_ bytes: C) where C.Element == UInt8 {
        if let data = bytes as? Data {
            hasher.update(data: data)
        } else if let done = bytes.withContiguousStorageIfAvailable({ hasher.update(bufferPointer: UnsafeRawBufferPointer($0)) }) {
            _ = done
        } else {
            hasher.update(data: Array(bytes))
        }
    }

    /// The digest as lowercase hex; the hasher should not be used afterwards.
    public mutating func finalizeHex() -> String { Self.hex(of: hasher.finalize()) }

    public static func hex<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
        var s = SHA256()
        s.update(bytes)
        return s.finalizeHex()
    }

    static func hex(of digest: Crypto.SHA256.Digest) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(64)
        for b in digest {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0xf)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}
