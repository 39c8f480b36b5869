package storage

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// BoltOpt changes the bbolt options a store is opened with, exactly as
// containerd's storage.Opt does. Use with care: NoSync, for one, gives up
// durability.
type BoltOpt func(*bolt.Options) error

// DefaultBoltTimeout is how long NewBoltMetaStore waits for another process
// to release the database file's lock before it fails with ErrLocked. A
// BoltOpt may set another Timeout; zero waits forever.
const DefaultBoltTimeout = 10 * time.Second

// NewBoltMetaStore opens (creating it if needed) the bbolt database file
// dbfile with containerd's layout (see keys.go) and returns a store on it.
// A file written by containerd's store opens unchanged, and containerd opens
// a file written here. A commit that returned nil is on disk (fsync) unless
// a BoltOpt turned syncing off.
//
// The file is opened at once, so a bad path or a lock held by another
// process is reported here: after the timeout (DefaultBoltTimeout unless a
// BoltOpt sets Options.Timeout) with ErrLocked (class Unavailable).
func NewBoltMetaStore(dbfile string, opts ...BoltOpt) (MetaStore, error) {
	options := *bolt.DefaultOptions
	// Statistics are never read; keeping them costs contention.
	options.NoStatistics = true
	options.Timeout = DefaultBoltTimeout
	for _, opt := range opts {
		if err := opt(&options); err != nil {
			return nil, err
		}
	}
	db, err := bolt.Open(dbfile, 0o600, &options)
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("open %s: waited %v: %w", dbfile, options.Timeout, ErrLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("failed to open database file %s: %w", dbfile, err)
	}
	return newMetaStore(&boltEngine{db: db}), nil
}

// The layout's keys as bytes, converted once rather than on every access.
var (
	bKeyVersion   = []byte(KeyVersion)
	bKeySnapshots = []byte(KeySnapshots)
	bKeyParents   = []byte(KeyParents)
	bKeyID        = []byte(KeyID)
	bKeyKind      = []byte(KeyKind)
	bKeyParent    = []byte(KeyParent)
	bKeyCreatedAt = []byte(KeyCreatedAt)
	bKeyUpdatedAt = []byte(KeyUpdatedAt)
	bKeyLabels    = []byte(KeyLabels)
	bKeyInodes    = []byte(KeyInodes)
	bKeySize      = []byte(KeySize)
	bKeyParentIDs = []byte(KeyParentIDs)
)

type boltEngine struct {
	db    *bolt.DB
	group boltGroup
}

func (e *boltEngine) begin(_ context.Context, writable bool) (engineTx, error) {
	tx, err := e.db.Begin(writable)
	if err != nil {
		return nil, err
	}
	return newBoltTx(tx), nil
}

func newBoltTx(tx *bolt.Tx) *boltTx {
	bt := &boltTx{tx: tx}
	if v := tx.Bucket(bKeyVersion); v != nil {
		bt.snaps = v.Bucket(bKeySnapshots)
		bt.parents = v.Bucket(bKeyParents)
	}
	return bt
}

func (e *boltEngine) close() error { return e.db.Close() }

// boltTx is one bbolt transaction. The buckets are nil until the first write
// creates them, as containerd does.
type boltTx struct {
	tx      *bolt.Tx
	snaps   *bolt.Bucket
	parents *bolt.Bucket
	// undo, when set, records how to revert each write: one caller's share
	// of a group commit (bolt_group.go) is undone this way.
	undo *undoLog
}

func (b *boltTx) commit(context.Context) error { return b.tx.Commit() }
func (b *boltTx) rollback() error              { return b.tx.Rollback() }

// ensureBuckets creates the layout's buckets for a write.
func (b *boltTx) ensureBuckets() error {
	if b.snaps != nil && b.parents != nil {
		return nil
	}
	b.undo.bucketsCreated(b)
	v, err := b.tx.CreateBucketIfNotExists(bKeyVersion)
	if err != nil {
		return fmt.Errorf("failed to create version bucket: %w", err)
	}
	if b.snaps, err = v.CreateBucketIfNotExists(bKeySnapshots); err != nil {
		return fmt.Errorf("failed to create snapshots bucket: %w", err)
	}
	if b.parents, err = v.CreateBucketIfNotExists(bKeyParents); err != nil {
		return fmt.Errorf("failed to create parents bucket: %w", err)
	}
	return nil
}

func (b *boltTx) get(_ context.Context, names ...string) ([]*record, error) {
	out := make([]*record, len(names))
	if b.snaps == nil {
		return out, nil
	}
	for i, name := range names {
		if name == "" {
			continue
		}
		sb := b.snaps.Bucket([]byte(name))
		if sb == nil {
			continue
		}
		r, err := decodeBolt(sb)
		if err != nil {
			return nil, fmt.Errorf("snapshot %q: %w", name, err)
		}
		out[i] = r
	}
	return out, nil
}

func (b *boltTx) put(name string, r *record) error {
	if err := b.ensureBuckets(); err != nil {
		return err
	}
	b.undo.bucketChanged(b.snaps, name)
	sb := b.snaps.Bucket([]byte(name))
	fresh := sb == nil
	if fresh {
		var err error
		if sb, err = b.snaps.CreateBucket([]byte(name)); err != nil {
			return fmt.Errorf("snapshot %q: %w", name, err)
		}
	}
	if err := encodeBolt(sb, r, fresh); err != nil {
		return fmt.Errorf("snapshot %q: %w", name, err)
	}
	return nil
}

func (b *boltTx) delete(name string) error {
	if b.snaps == nil {
		return nil
	}
	b.undo.bucketChanged(b.snaps, name)
	return b.snaps.DeleteBucket([]byte(name))
}

func (b *boltTx) link(parent, child ref) error {
	if err := b.ensureBuckets(); err != nil {
		return err
	}
	k := parentLinkKey(parent.id, child.id)
	b.undo.keyChanged(b.parents, k)
	return b.parents.Put(k, []byte(child.name))
}

func (b *boltTx) unlink(parent, child ref) error {
	if b.parents == nil {
		return nil
	}
	k := parentLinkKey(parent.id, child.id)
	b.undo.keyChanged(b.parents, k)
	return b.parents.Delete(k)
}

func (b *boltTx) willCheckChildren(string) {} // a cursor seek is cheap

func (b *boltTx) hasChildren(_ context.Context, p ref) (bool, error) {
	if b.parents == nil {
		return false, nil
	}
	prefix := parentLinkPrefix(p.id)
	k, _ := b.parents.Cursor().Seek(prefix)
	return k != nil && bytes.HasPrefix(k, prefix), nil
}

func (b *boltTx) scan(_ context.Context, fn func(name string, r *record, err error) error) error {
	if b.snaps == nil {
		return nil
	}
	return b.snaps.ForEachBucket(func(k []byte) error {
		r, err := decodeBolt(b.snaps.Bucket(k))
		return fn(string(k), r, err)
	})
}

func (b *boltTx) scanLinks(_ context.Context, fn func(parent, child ref) error) error {
	if b.parents == nil {
		return nil
	}
	return b.parents.ForEach(func(k, v []byte) error {
		parent, n := binary.Uvarint(k)
		if n <= 0 || len(k) <= n || k[n] != 0 {
			return fmt.Errorf("parents key %x: %w", k, ErrCorrupt)
		}
		child, m := binary.Uvarint(k[n+1:])
		if m <= 0 || n+1+m != len(k) {
			return fmt.Errorf("parents key %x: %w", k, ErrCorrupt)
		}
		return fn(ref{id: parent}, ref{name: string(v), id: child})
	})
}

func (b *boltTx) idLimit(context.Context) (uint64, error) {
	if b.snaps == nil {
		return 0, nil
	}
	return b.snaps.Sequence(), nil
}

func (b *boltTx) nextID(context.Context) (uint64, error) {
	if err := b.ensureBuckets(); err != nil {
		return 0, err
	}
	b.undo.sequenceChanged(b.snaps)
	return b.snaps.NextSequence()
}

func (b *boltTx) raiseIDs(_ context.Context, id uint64) error {
	if err := b.ensureBuckets(); err != nil {
		return err
	}
	if b.snaps.Sequence() >= id {
		return nil
	}
	b.undo.sequenceChanged(b.snaps)
	return b.snaps.SetSequence(id)
}

// parentLinkKey is containerd's parents-bucket key: the uvarint parent ID, a
// zero byte, the uvarint child ID.
func parentLinkKey(parent, child uint64) []byte {
	k := binary.AppendUvarint(parentLinkPrefix(parent), child)
	return k
}

func parentLinkPrefix(parent uint64) []byte {
	k := binary.AppendUvarint(make([]byte, 0, 2*binary.MaxVarintLen64+1), parent)
	return append(k, 0)
}

// decodeBolt reads a snapshot bucket. Containerd leaves some keys out (usage
// of non-committed snapshots, our parentids); anything present but malformed
// is ErrCorrupt.
func decodeBolt(sb *bolt.Bucket) (*record, error) {
	var r record
	id, n := binary.Uvarint(sb.Get(bKeyID))
	if n <= 0 {
		return nil, fmt.Errorf("bad %q: %w", KeyID, ErrCorrupt)
	}
	r.ID = id
	kind := sb.Get(bKeyKind)
	if len(kind) != 1 {
		return nil, fmt.Errorf("bad %q: %w", KeyKind, ErrCorrupt)
	}
	r.Kind = snapshots.Kind(kind[0])
	r.Parent = string(sb.Get(bKeyParent))
	for _, ts := range []struct {
		key []byte
		t   *time.Time
	}{{bKeyCreatedAt, &r.Created}, {bKeyUpdatedAt, &r.Updated}} {
		if v := sb.Get(ts.key); v != nil {
			if err := ts.t.UnmarshalBinary(v); err != nil {
				return nil, fmt.Errorf("bad %q: %v: %w", ts.key, err, ErrCorrupt)
			}
			*ts.t = ts.t.UTC() // a zone this package never writes would not encode again
		}
	}
	if lb := sb.Bucket(bKeyLabels); lb != nil {
		_ = lb.ForEach(func(k, v []byte) error {
			if r.Labels == nil {
				r.Labels = map[string]string{}
			}
			r.Labels[string(k)] = string(v)
			return nil
		})
	}
	for _, u := range []struct {
		key []byte
		v   *int64
	}{{bKeyInodes, &r.Usage.Inodes}, {bKeySize, &r.Usage.Size}} {
		if v := sb.Get(u.key); v != nil {
			x, n := binary.Varint(v)
			if n <= 0 {
				return nil, fmt.Errorf("bad %q: %w", u.key, ErrCorrupt)
			}
			*u.v = x
		}
	}
	for v := sb.Get(bKeyParentIDs); len(v) > 0; {
		id, n := binary.Uvarint(v)
		if n <= 0 {
			return nil, fmt.Errorf("bad %q: %w", KeyParentIDs, ErrCorrupt)
		}
		r.ParentIDs = append(r.ParentIDs, id)
		v = v[n:]
	}
	return &r, nil
}

// encodeBolt writes r into a snapshot bucket the way containerd does, plus
// the parent chain; fresh says the bucket was just created (nothing to
// delete).
func encodeBolt(sb *bolt.Bucket, r *record, fresh bool) error {
	put := func(key, v []byte) error {
		switch {
		case v != nil:
			return sb.Put(key, v)
		case fresh:
			return nil
		}
		return sb.Delete(key)
	}
	created, err := r.Created.MarshalBinary()
	if err != nil {
		return err
	}
	updated, err := r.Updated.MarshalBinary()
	if err != nil {
		return err
	}
	var parent, inodes, size, chain []byte
	if r.Parent != "" {
		parent = []byte(r.Parent)
	}
	if r.Kind == snapshots.KindCommitted {
		inodes = binary.AppendVarint(nil, r.Usage.Inodes)
		size = binary.AppendVarint(nil, r.Usage.Size)
	}
	for _, id := range r.ParentIDs {
		chain = binary.AppendUvarint(chain, id)
	}
	for _, kv := range []struct {
		key []byte
		v   []byte
	}{
		{bKeyID, binary.AppendUvarint(nil, r.ID)},
		{bKeyKind, []byte{byte(r.Kind)}},
		{bKeyParent, parent},
		{bKeyCreatedAt, created},
		{bKeyUpdatedAt, updated},
		{bKeyInodes, inodes},
		{bKeySize, size},
		{bKeyParentIDs, chain},
	} {
		if err := put(kv.key, kv.v); err != nil {
			return fmt.Errorf("failed to write %q: %w", kv.key, err)
		}
	}
	return writeBoltLabels(sb, r.Labels, fresh)
}

// writeBoltLabels replaces the labels bucket; containerd keeps no bucket for
// no labels.
func writeBoltLabels(sb *bolt.Bucket, labels map[string]string, fresh bool) error {
	if !fresh && sb.Bucket(bKeyLabels) != nil {
		if err := sb.DeleteBucket(bKeyLabels); err != nil {
			return err
		}
	}
	if len(labels) == 0 {
		return nil
	}
	lb, err := sb.CreateBucket(bKeyLabels)
	if err != nil {
		return err
	}
	for k, v := range labels {
		if err := lb.Put([]byte(k), []byte(v)); err != nil {
			return fmt.Errorf("failed to set label %q: %w", k, err)
		}
	}
	return nil
}
