package storage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	bolt "go.etcd.io/bbolt"
)

// Fuzz tests of the encoders: the etcd record format, the children-index
// name escaping and the bbolt snapshot bucket. Seeds live in
// testdata/fuzz/<FuzzName>/ and run with every `go test`; fuzz one with
//
//	go test -run '^$' -fuzz '^FuzzDecodeRecord$' -fuzztime 30s .

// fuzzChain reads a parent chain from b: uvarints until b ends or one does
// not parse.
func fuzzChain(b []byte) []uint64 {
	var chain []uint64
	for len(b) > 0 {
		id, n := binary.Uvarint(b)
		if n <= 0 {
			break
		}
		chain = append(chain, id)
		b = b[n:]
	}
	return chain
}

// fuzzLabels reads labels from b: NUL-separated key, value, key, value...;
// nil when there are none, as records keep them.
func fuzzLabels(b []byte) map[string]string {
	parts := bytes.Split(b, []byte{0})
	var labels map[string]string
	for i := 0; i+1 < len(parts); i += 2 {
		if labels == nil {
			labels = map[string]string{}
		}
		labels[string(parts[i])] = string(parts[i+1])
	}
	return labels
}

// fuzzRecord builds a record as the rules write it: times in UTC.
func fuzzRecord(id uint64, kind byte, parent string, chain, labels []byte, created, updated int64, createdNano, updatedNano uint32, inodes, size int64) *record {
	return &record{
		ID:        id,
		Kind:      snapshots.Kind(kind),
		Parent:    parent,
		ParentIDs: fuzzChain(chain),
		Labels:    fuzzLabels(labels),
		Created:   time.Unix(created, int64(createdNano%1e9)).UTC(),
		Updated:   time.Unix(updated, int64(updatedNano%1e9)).UTC(),
		Usage:     snapshots.Usage{Inodes: inodes, Size: size},
	}
}

// diffRecords describes how got differs from want, times compared with
// Equal; empty when they are the same record.
func diffRecords(want, got *record) string {
	var d []string
	if want.ID != got.ID {
		d = append(d, fmt.Sprintf("ID %d != %d", want.ID, got.ID))
	}
	if want.Kind != got.Kind {
		d = append(d, fmt.Sprintf("Kind %d != %d", want.Kind, got.Kind))
	}
	if want.Parent != got.Parent {
		d = append(d, fmt.Sprintf("Parent %q != %q", want.Parent, got.Parent))
	}
	if !slices.Equal(want.ParentIDs, got.ParentIDs) || (want.ParentIDs == nil) != (got.ParentIDs == nil) {
		d = append(d, fmt.Sprintf("ParentIDs %#v != %#v", want.ParentIDs, got.ParentIDs))
	}
	if !maps.Equal(want.Labels, got.Labels) || (want.Labels == nil) != (got.Labels == nil) {
		d = append(d, fmt.Sprintf("Labels %q != %q", want.Labels, got.Labels))
	}
	if !want.Created.Equal(got.Created) {
		d = append(d, fmt.Sprintf("Created %v != %v", want.Created, got.Created))
	}
	if !want.Updated.Equal(got.Updated) {
		d = append(d, fmt.Sprintf("Updated %v != %v", want.Updated, got.Updated))
	}
	if want.Usage != got.Usage {
		d = append(d, fmt.Sprintf("Usage %+v != %+v", want.Usage, got.Usage))
	}
	if want.Content != got.Content {
		d = append(d, fmt.Sprintf("Content %q != %q", want.Content, got.Content))
	}
	if want.ChainFrom != got.ChainFrom {
		d = append(d, fmt.Sprintf("ChainFrom %q != %q", want.ChainFrom, got.ChainFrom))
	}
	return strings.Join(d, "; ")
}

// FuzzRecordRoundTrip: every record the rules can write decodes to itself.
func FuzzRecordRoundTrip(f *testing.F) {
	f.Add(uint64(1), byte(snapshots.KindActive), "", []byte(nil), []byte(nil), int64(1700000000), int64(1700000000), uint32(0), uint32(0), int64(0), int64(0))
	f.Add(uint64(300), byte(snapshots.KindCommitted), "base", []byte{0x80, 0x02, 0x01}, []byte("containerd.io/snapshot/layer\x00sha256:00\x00a\x00"), int64(-62135596800), int64(253402300799), uint32(999999999), uint32(1), int64(-1), int64(1<<62))
	f.Add(uint64(1<<64-1), byte(255), "a/b\x00%2F", []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, []byte("\x00\x00"), int64(0), int64(-1), uint32(4e9), uint32(5), int64(-1<<63), int64(1<<63-1))
	f.Fuzz(func(t *testing.T, id uint64, kind byte, parent string, chain, labels []byte, created, updated int64, createdNano, updatedNano uint32, inodes, size int64) {
		r := fuzzRecord(id, kind, parent, chain, labels, created, updated, createdNano, updatedNano, inodes, size)
		b := encodeRecord(r)
		got, err := decodeRecord(b)
		if err != nil {
			t.Fatalf("decodeRecord(encodeRecord(%+v)) failed: %v\nbytes %x", r, err, b)
		}
		if d := diffRecords(r, got); d != "" {
			t.Fatalf("record changed in a round trip: %s", d)
		}
		if again := encodeRecord(got); !bytes.Equal(again, b) {
			t.Fatalf("encoding is not canonical:\n%x\n%x", b, again)
		}
	})
}

// fuzzOddZoneTime is a timestamp that time.UnmarshalBinary accepts but
// time.MarshalBinary cannot write back: version 2, zone offset -2 minutes
// +1 second (UTC-00:01:59), whose whole minutes are -1, the value
// MarshalBinary reserves for UTC. Only a foreign or corrupt store holds one
// (the rules write UTC), but a decoder that accepts it must not produce a
// record its encoder cannot write.
func fuzzOddZoneTime() []byte {
	b, _ := time.Unix(1700000000, 0).UTC().MarshalBinary()
	b[0] = 2
	b[13], b[14] = 0xff, 0xfe
	return append(b, 1)
}

// fuzzRecordBytes is a version 1 etcd record with no parent, chain or
// labels, and the given timestamps.
func fuzzRecordBytes(created, updated []byte) []byte {
	b := []byte{recordVersion, 1, byte(snapshots.KindActive), 0, 0, 0}
	b = appendBytes(b, created)
	b = appendBytes(b, updated)
	return append(b, 0, 0)
}

// FuzzDecodeRecord: decoding arbitrary bytes never panics, fails only with
// ErrCorrupt, and a record that decodes encodes back to one that decodes
// to the same record.
func FuzzDecodeRecord(f *testing.F) {
	utc, _ := time.Unix(1700000000, 0).UTC().MarshalBinary()
	f.Add([]byte{})
	f.Add([]byte{recordVersion})
	f.Add([]byte("\x01\xff\xff"))
	f.Add(fuzzRecordBytes(utc, utc))
	f.Add(fuzzRecordBytes(fuzzOddZoneTime(), utc))
	f.Add(encodeRecord(fuzzRecord(7, byte(snapshots.KindCommitted), "p", []byte{3, 2, 1}, []byte("k\x00v"), 1700000000, 1700000001, 5, 6, 7, 8)))
	f.Add(encodeRecord(&record{ID: 1, Kind: snapshots.KindView}))
	f.Add(encodeRecord(&record{ID: 4, Kind: snapshots.KindCommitted, Content: "sha256:chain"}))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeRecord(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("decode error is not ErrCorrupt: %v", err)
			}
			return
		}
		again := encodeRecord(r)
		r2, err := decodeRecord(again)
		if err != nil {
			t.Fatalf("a decoded record does not decode after re-encoding: %v\nrecord %+v\ninput   %x\nencoded %x", err, r, b, again)
		}
		if d := diffRecords(r, r2); d != "" {
			t.Fatalf("re-encoding changed the record: %s", d)
		}
	})
}

// TestFuzzCrasherDecodeRecordAllocationIsBounded: corrupt input cannot make
// decodeRecord allocate more than the input could describe (the promise of
// recordDecoder.count). Here a list count follows a field that failed to
// decode; count must refuse it like any other. Fuzzing found this with a
// 12-byte record that made decodeRecord ask for 105 GB and killed the
// process ("fatal error: runtime: out of memory", which no recover stops).
// The counts below are small enough to allocate, so this test fails rather
// than crashes while the bug is there.
func TestFuzzCrasherDecodeRecordAllocationIsBounded(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input []byte
	}{
		// version, ID 1, kind 1, parent of 127 bytes that are not there;
		// then a chain count of 2^24 (a 128 MiB slice).
		{"chain count after a bad parent", append([]byte{recordVersion, 1, 1, 0x7f}, binary.AppendUvarint(nil, 1<<24)...)},
		// ... an empty chain, then a label count of 2^21 (a map of 2M).
		{"label count after a bad parent", append([]byte{recordVersion, 1, 1, 0x7f, 0}, binary.AppendUvarint(nil, 1<<21)...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := decodeRecord(tc.input)
			runtime.ReadMemStats(&after)
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("decodeRecord(%x) = %v, want ErrCorrupt", tc.input, err)
			}
			if n := after.TotalAlloc - before.TotalAlloc; n > 16<<20 {
				t.Errorf("decodeRecord allocated %d MiB for a %d-byte input %x", n>>20, len(tc.input), tc.input)
			}
		})
	}
}

// FuzzEscapeName: escaping is a bijection onto the strings unescapeName
// accepts, and an escaped name never contains '/', so one parent's
// children-index prefix never reaches into another's.
func FuzzEscapeName(f *testing.F) {
	for _, s := range []string{"", "a", "/", "%", "%2F", "%25", "a/b", "../x", "a/storage.v1/snapshots/b", "trailing/", "%2f", "%%", "%2", "\x00/\xff"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		e := escapeName(s)
		if strings.Contains(e, "/") {
			t.Fatalf("escapeName(%q) = %q contains '/'", s, e)
		}
		back, ok := unescapeName(e)
		if !ok || back != s {
			t.Fatalf("unescapeName(escapeName(%q)) = %q, %v", s, back, ok)
		}
		// s as an index key element read back from etcd: any string.
		u, ok := unescapeName(s)
		if ok {
			if strings.Contains(s, "/") {
				t.Fatalf("unescapeName accepted %q, which contains '/'", s)
			}
			if escapeName(u) != s {
				t.Fatalf("unescapeName(%q) = %q, but that escapes to %q: two keys for one name", s, u, escapeName(u))
			}
		}
	})
}

// fuzzBoltDB opens a bbolt database for one fuzz target; every iteration
// works in a transaction that is rolled back.
func fuzzBoltDB(f *testing.F) *bolt.DB {
	db, err := bolt.Open(filepath.Join(f.TempDir(), "fuzz.db"), 0o600, &bolt.Options{NoSync: true, NoFreelistSync: true})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = db.Close() })
	return db
}

// fuzzInBucket runs fn on a fresh snapshot bucket in a transaction that is
// rolled back.
func fuzzInBucket(t *testing.T, db *bolt.DB, fn func(sb *bolt.Bucket)) {
	tx, err := db.Begin(true)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback() }()
	sb, err := tx.CreateBucket([]byte("snapshot"))
	if err != nil {
		t.Fatal(err)
	}
	fn(sb)
}

// FuzzBoltRecord: every record the rules can write round-trips through a
// bbolt snapshot bucket, except that usage is kept for committed
// snapshots only (as containerd does).
func FuzzBoltRecord(f *testing.F) {
	db := fuzzBoltDB(f)
	f.Add(uint64(1), byte(snapshots.KindActive), "", []byte(nil), []byte(nil), int64(1700000000), int64(1700000000), uint32(0), uint32(0), int64(0), int64(0))
	f.Add(uint64(300), byte(snapshots.KindCommitted), "base", []byte{0x80, 0x02, 0x01}, []byte("containerd.io/snapshot/layer\x00sha256:00\x00a\x00"), int64(-62135596800), int64(253402300799), uint32(999999999), uint32(1), int64(-1), int64(1<<62))
	f.Add(uint64(1<<64-1), byte(255), "a/b\x00%2F", []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, []byte("\x00\x00"), int64(0), int64(-1), uint32(4e9), uint32(5), int64(-1<<63), int64(1<<63-1))
	f.Fuzz(func(t *testing.T, id uint64, kind byte, parent string, chain, labels []byte, created, updated int64, createdNano, updatedNano uint32, inodes, size int64) {
		r := fuzzRecord(id, kind, parent, chain, labels, created, updated, createdNano, updatedNano, inodes, size)
		badLabel := false
		for k := range r.Labels {
			badLabel = badLabel || k == "" || len(k) > bolt.MaxKeySize
		}
		fuzzInBucket(t, db, func(sb *bolt.Bucket) {
			err := encodeBolt(sb, r, false)
			if badLabel {
				// The rules refuse such labels before any write; bbolt
				// cannot store them.
				if err == nil {
					t.Fatalf("encodeBolt stored a label key bbolt cannot hold: %q", r.Labels)
				}
				return
			}
			if err != nil {
				t.Fatalf("encodeBolt(%+v): %v", r, err)
			}
			got, err := decodeBolt(sb, true)
			if err != nil {
				t.Fatalf("decodeBolt after encodeBolt(%+v): %v", r, err)
			}
			want := *r
			if want.Kind != snapshots.KindCommitted {
				want.Usage = snapshots.Usage{}
			}
			if d := diffRecords(&want, got); d != "" {
				t.Fatalf("record changed in a round trip through bbolt: %s", d)
			}
			// Writing again over the same bucket (as UpdateInfo does)
			// leaves nothing of the old record behind.
			other := &record{ID: id + 1, Kind: snapshots.KindView, Created: want.Created, Updated: want.Updated}
			if err := encodeBolt(sb, other, false); err != nil {
				t.Fatalf("encodeBolt over an existing record: %v", err)
			}
			got, err = decodeBolt(sb, true)
			if err != nil {
				t.Fatalf("decodeBolt after rewriting: %v", err)
			}
			if d := diffRecords(other, got); d != "" {
				t.Fatalf("rewriting a bucket left the old record behind: %s", d)
			}
		})
	})
}

// FuzzBoltDecode: a snapshot bucket holding arbitrary values (a corrupt or
// foreign file) never makes decodeBolt panic; it fails with ErrCorrupt or
// gives a record that encodeBolt writes back and decodeBolt reads the same.
func FuzzBoltDecode(f *testing.F) {
	db := fuzzBoltDB(f)
	uv := func(v uint64) []byte { return binary.AppendUvarint(nil, v) }
	ts, _ := time.Unix(1700000000, 5).UTC().MarshalBinary()
	f.Add(uv(1), []byte{byte(snapshots.KindActive)}, []byte(nil), ts, ts, []byte(nil), []byte(nil), []byte(nil), []byte(nil))
	f.Add(uv(9), []byte{byte(snapshots.KindCommitted)}, []byte("base"), ts, ts, binary.AppendVarint(nil, 3), binary.AppendVarint(nil, 4096), append(uv(4), uv(1)...), []byte("k\x00v"))
	f.Add([]byte{0x80}, []byte("xx"), []byte("p"), []byte{1, 2}, []byte(nil), []byte{0x80}, []byte(nil), []byte{0x80}, []byte("\x00"))
	f.Add(uv(2), []byte{byte(snapshots.KindActive)}, []byte(nil), fuzzOddZoneTime(), ts, []byte(nil), []byte(nil), []byte(nil), []byte(nil))
	f.Fuzz(func(t *testing.T, id, kind, parent, created, updated, inodes, size, parentIDs, labels []byte) {
		fuzzInBucket(t, db, func(sb *bolt.Bucket) {
			for _, kv := range []struct {
				key string
				v   []byte
			}{
				{KeyID, id}, {KeyKind, kind}, {KeyParent, parent}, {KeyCreatedAt, created},
				{KeyUpdatedAt, updated}, {KeyInodes, inodes}, {KeySize, size}, {KeyParentIDs, parentIDs},
			} {
				if kv.v == nil {
					continue
				}
				if err := sb.Put([]byte(kv.key), kv.v); err != nil {
					t.Fatal(err)
				}
			}
			if ls := fuzzLabels(labels); ls != nil {
				lb, err := sb.CreateBucket([]byte(KeyLabels))
				if err != nil {
					t.Fatal(err)
				}
				for k, v := range ls {
					if k == "" {
						continue // bbolt holds no empty key
					}
					if err := lb.Put([]byte(k), []byte(v)); err != nil {
						t.Fatal(err)
					}
				}
			}
			r, err := decodeBolt(sb, true)
			if err != nil {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("decode error is not ErrCorrupt: %v", err)
				}
				return
			}
			if err := encodeBolt(sb, r, false); err != nil {
				t.Fatalf("a record decodeBolt read cannot be written back: %v\nrecord %+v", err, r)
			}
			r2, err := decodeBolt(sb, true)
			if err != nil {
				t.Fatalf("a record decodeBolt read does not decode after writing it back: %v", err)
			}
			if r.Kind != snapshots.KindCommitted {
				// Usage is kept for committed snapshots only; what a
				// foreign file holds for others is dropped on rewrite.
				r.Usage = snapshots.Usage{}
			}
			if d := diffRecords(r, r2); d != "" {
				t.Fatalf("writing back changed the record: %s", d)
			}
		})
	})
}

// FuzzDecodeLayer: a shared layer's record (etcd's layers/<ID>) that does
// not decode fails with ErrCorrupt, never a panic, and one that decodes
// encodes back to itself.
func FuzzDecodeLayer(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{layerVersion})
	f.Add(encodeLayer(&layer{Content: "c", ParentIDs: []uint64{3, 2}, Usage: snapshots.Usage{Inodes: 1, Size: 2},
		Refs: []layerRef{{"a", "x"}, {"b", "y"}}}))
	f.Add(append([]byte{layerVersion, 1, 'c', 0, 0, 0}, binary.AppendUvarint(nil, 1<<30)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := decodeLayer(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("decode error is not ErrCorrupt: %v", err)
			}
			return
		}
		again, err := decodeLayer(encodeLayer(l))
		if err != nil {
			t.Fatalf("a decoded layer does not decode after re-encoding: %v", err)
		}
		if again.Content != l.Content || !slices.Equal(again.ParentIDs, l.ParentIDs) || again.Usage != l.Usage || !slices.Equal(again.Refs, l.Refs) {
			t.Fatalf("re-encoding changed the layer: %+v != %+v", again, l)
		}
	})
}

// FuzzDecodeChainPiece: a bbolt chainpiece value that does not decode
// fails, never panics, and one that decodes encodes back to itself.
func FuzzDecodeChainPiece(f *testing.F) {
	f.Add([]byte{})
	f.Add(encodeChainPiece(nil, "c0128", []uint64{300, 299, 1}))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0x0f, 'a'})
	f.Fuzz(func(t *testing.T, b []byte) {
		from, ids, err := decodeChainPiece(b)
		if err != nil {
			return
		}
		from2, ids2, err := decodeChainPiece(encodeChainPiece(nil, from, ids))
		if err != nil || from2 != from || !slices.Equal(ids2, ids) {
			t.Fatalf("re-encoding changed the piece: %q %v -> %q %v (%v)", from, ids, from2, ids2, err)
		}
	})
}
