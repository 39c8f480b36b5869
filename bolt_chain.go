package storage

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Parent chains in pieces (bbolt).
//
// A record keeps its parent ID chain so that GetSnapshot, which a driver
// calls on every mount, costs one lookup. Kept whole, a chain of depth d
// costs every record d IDs: a file quadratic in the depth (194 MiB at depth
// 10,000, where containerd's is 8 MiB). So a record stores its whole chain
// (parentids) only up to boltChainWhole IDs, which covers every image
// containerd unpacks (it stops at 127 layers); deeper, it stores under chainpiece the name of the ancestor whose stored
// chain goes on from where its own stops, and the head of its chain (at
// most boltChainPiece IDs), in one value. A child's
// piece is its parent's with the parent's ID in front, going on from the
// same ancestor, until it is full; then the next piece starts, going on
// from the parent: a put reads only the parent's two keys. Reading a chain
// of depth d > 128 takes 1 + ceil((d-128)/32) lookups; every record stores
// at most 128 IDs, and records deeper than 128 at most 32.
//
// containerd ignores both keys, and older versions of this package, which
// know only parentids, follow the parents of a record without it: neither
// ever reads a piece as a whole chain.
const (
	boltChainWhole = 128
	boltChainPiece = 32
)

var bKeyChainPiece = []byte(KeyChainPiece)

// encodeChainPiece is the value of chainpiece: the uvarint length of from,
// from, then the IDs as uvarints.
func encodeChainPiece(buf []byte, from string, ids []uint64) []byte {
	buf = appendBytes(buf, []byte(from))
	return appendUvarints(buf, ids)
}

// decodeChainPiece inverts encodeChainPiece; v nil is a bucket where the
// layout has a value.
func decodeChainPiece(v []byte) (from string, ids []uint64, err error) {
	if v == nil {
		return "", nil, errBoltNotValue
	}
	n, k := binary.Uvarint(v)
	if k <= 0 || n == 0 || n > uint64(len(v)-k) {
		return "", nil, errors.New("bad name of the ancestor it goes on from")
	}
	from, v = string(v[k:k+int(n)]), v[k+int(n):]
	if ids, err = decodeUvarints(v); err == nil && len(ids) == 0 {
		err = errors.New("no IDs")
	}
	return from, ids, err
}

// piece returns what a record with the whole chain r.ParentIDs stores:
// the chain itself (from empty) or its head and the ancestor it goes on
// from. A parent that stores a chain deeper than boltChainWhole whole
// (written before pieces existed) gets children that do too.
func (b *boltTx) piece(r *record) (ids []uint64, from string) {
	d := len(r.ParentIDs)
	if d <= boltChainWhole {
		return r.ParentIDs, ""
	}
	pb := b.snaps.Bucket([]byte(r.Parent))
	if pb == nil {
		return r.ParentIDs, ""
	}
	pv := pb.Get(bKeyChainPiece)
	if pv == nil {
		if d-1 == boltChainWhole {
			return r.ParentIDs[:1], r.Parent // the parent's whole chain goes on
		}
		return r.ParentIDs, ""
	}
	pfrom, pids, err := decodeChainPiece(pv)
	if err != nil {
		return r.ParentIDs, "" // a damaged parent: this record stays sound
	}
	n := len(pids)
	if n >= boltChainPiece || n+1 > d {
		return r.ParentIDs[:1], r.Parent
	}
	return r.ParentIDs[:n+1], pfrom
}

// wholeChain completes the chain of r, read as a piece, from the
// ancestors it goes on from.
func (b *boltTx) wholeChain(name string, r *record) error {
	if r.ChainFrom == "" {
		return nil
	}
	chain := append([]uint64(nil), r.ParentIDs...)
	visited := map[string]bool{}
	for from := r.ChainFrom; from != ""; {
		if visited[from] {
			return fmt.Errorf("snapshot %q: parent chain loops at %q: %w", name, from, ErrCorrupt)
		}
		visited[from] = true
		sb, err := layoutBucket(b.snaps, []byte(from))
		if sb == nil {
			if err == nil {
				err = ErrCorrupt
			}
			return fmt.Errorf("snapshot %q: parent chain goes on from %q, which cannot be read: %w", name, from, err)
		}
		a, err := decodeBolt(sb, false)
		if err != nil {
			return fmt.Errorf("snapshot %q: parent chain goes on from %q: %w", name, from, err)
		}
		if a.ID != chain[len(chain)-1] {
			return fmt.Errorf("snapshot %q: parent chain goes on from %q, ID %d, where the chain has ID %d: %w", name, from, a.ID, chain[len(chain)-1], ErrCorrupt)
		}
		chain = append(chain, a.ParentIDs...)
		if a.Parent != "" && len(a.ParentIDs) == 0 {
			return fmt.Errorf("snapshot %q: parent chain goes on from %q, which stores none: %w", name, from, ErrCorrupt)
		}
		from = a.ChainFrom
	}
	r.ParentIDs, r.ChainFrom = chain, ""
	return nil
}

// appendUvarints encodes ids as the chain keys hold them.
func appendUvarints(buf []byte, ids []uint64) []byte {
	for _, id := range ids {
		buf = binary.AppendUvarint(buf, id)
	}
	return buf
}

// decodeUvarints reads a chain key; v nil is a bucket where the layout has
// a value.
func decodeUvarints(v []byte) ([]uint64, error) {
	if v == nil {
		return nil, errBoltNotValue // would read as no chain
	}
	var ids []uint64
	for len(v) > 0 {
		id, n := binary.Uvarint(v)
		if n <= 0 {
			return nil, ErrCorrupt
		}
		ids = append(ids, id)
		v = v[n:]
	}
	return ids, nil
}
