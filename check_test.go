package storage_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/snapmeta/storage"
)

// This file tests storage.Check on both engines: a clean store has no
// problems, and every corruption injected through the raw engine (bbolt
// buckets, etcd keys, laid out as keys.go documents) is reported precisely.
// The engine plumbing here (chkEngines, chkStore, chkRaw) is shared with
// hostile_test.go.

// chkEngine makes fresh stores of one engine.
type chkEngine struct {
	name  string
	fresh func(t *testing.T) *chkStore
}

// chkStore is one store under test with raw access to what it keeps.
type chkStore struct {
	engine string
	ms     storage.MetaStore
	root   string // etcd's
	// reopen closes the store (if it is not closed yet) and opens it again.
	reopen func(t *testing.T)
	// raw stops the store, runs fn on the raw engine and reopens the store.
	raw func(t *testing.T, fn func(r chkRaw))
}

// chkRaw reads and writes an engine's keys directly, bypassing every rule.
type chkRaw interface {
	record(name string) chkRecord
	setRecord(name string, r chkRecord)
	putGarbage(name string)
	deleteRecord(name string)
	// putLink and deleteLink write the children-index entry "child has
	// parent"; bbolt keys it by parentID, etcd by the parent's name.
	putLink(parent string, parentID, child uint64, childName string)
	deleteLink(parent string, parentID, child uint64)
	// putBadLink writes a children-index key that no engine could have
	// written.
	putBadLink()
	// idLimit is the highest ID the allocator has handed out, by the layout.
	idLimit() uint64
}

// chkRecord is the part of a stored record that Check judges. For etcd,
// tail keeps the rest of the record (labels, times, usage) verbatim.
type chkRecord struct {
	ID     uint64
	Kind   snapshots.Kind
	Parent string
	Chain  []uint64
	tail   []byte
}

func chkEngines() []chkEngine {
	return []chkEngine{
		{name: "bolt", fresh: chkFreshBolt},
		{name: "etcd", fresh: chkFreshEtcd},
	}
}

func chkFreshBolt(t *testing.T) *chkStore {
	dir := t.TempDir()
	s := &chkStore{engine: "bolt", ms: openBolt(t, dir)}
	s.reopen = func(t *testing.T) {
		require.NoError(t, s.ms.Close())
		s.ms = openBolt(t, dir)
	}
	s.raw = func(t *testing.T, fn func(r chkRaw)) {
		t.Helper()
		require.NoError(t, s.ms.Close())
		db, err := bolt.Open(filepath.Join(dir, "metadata.db"), 0o600, &bolt.Options{Timeout: 5 * time.Second})
		require.NoError(t, err)
		require.NoError(t, db.Update(func(tx *bolt.Tx) error {
			fn(&chkBoltRaw{t: t, tx: tx})
			return nil
		}))
		require.NoError(t, db.Close())
		s.ms = openBolt(t, dir)
	}
	return s
}

func chkFreshEtcd(t *testing.T) *chkStore {
	root := uniqueRoot(t)
	s := &chkStore{engine: "etcd", ms: openEtcd(t, root), root: root}
	s.reopen = func(t *testing.T) {
		require.NoError(t, s.ms.Close())
		s.ms = openEtcd(t, root)
	}
	s.raw = func(t *testing.T, fn func(r chkRaw)) {
		t.Helper()
		require.NoError(t, s.ms.Close())
		cli := etcdServer(t).Client(t)
		fn(&chkEtcdRaw{t: t, cli: cli, prefix: root + "/" + storage.KeyEtcdVersion + "/"})
		s.ms = openEtcd(t, root)
	}
	return s
}

// chkBoltRaw edits a bbolt file with containerd's layout.
type chkBoltRaw struct {
	t  *testing.T
	tx *bolt.Tx
}

func (b *chkBoltRaw) snaps() *bolt.Bucket {
	v := b.tx.Bucket([]byte(storage.KeyVersion))
	require.NotNil(b.t, v, "no %q bucket", storage.KeyVersion)
	s := v.Bucket([]byte(storage.KeySnapshots))
	require.NotNil(b.t, s, "no %q bucket", storage.KeySnapshots)
	return s
}

func (b *chkBoltRaw) parents() *bolt.Bucket {
	p := b.tx.Bucket([]byte(storage.KeyVersion)).Bucket([]byte(storage.KeyParents))
	require.NotNil(b.t, p, "no %q bucket", storage.KeyParents)
	return p
}

func (b *chkBoltRaw) bucket(name string) *bolt.Bucket {
	sb := b.snaps().Bucket([]byte(name))
	require.NotNil(b.t, sb, "no bucket for snapshot %q", name)
	return sb
}

func (b *chkBoltRaw) record(name string) chkRecord {
	sb := b.bucket(name)
	id, n := binary.Uvarint(sb.Get([]byte(storage.KeyID)))
	require.Positive(b.t, n, "id of %q", name)
	kind := sb.Get([]byte(storage.KeyKind))
	require.Len(b.t, kind, 1, "kind of %q", name)
	r := chkRecord{ID: id, Kind: snapshots.Kind(kind[0]), Parent: string(sb.Get([]byte(storage.KeyParent)))}
	for v := sb.Get([]byte(storage.KeyParentIDs)); len(v) > 0; {
		id, n := binary.Uvarint(v)
		require.Positive(b.t, n, "parentids of %q", name)
		r.Chain = append(r.Chain, id)
		v = v[n:]
	}
	return r
}

func (b *chkBoltRaw) setRecord(name string, r chkRecord) {
	sb := b.bucket(name)
	put := func(k string, v []byte) {
		if len(v) == 0 {
			require.NoError(b.t, sb.Delete([]byte(k)))
			return
		}
		require.NoError(b.t, sb.Put([]byte(k), v))
	}
	var chain []byte
	for _, id := range r.Chain {
		chain = binary.AppendUvarint(chain, id)
	}
	put(storage.KeyID, binary.AppendUvarint(nil, r.ID))
	put(storage.KeyKind, []byte{byte(r.Kind)})
	put(storage.KeyParent, []byte(r.Parent))
	put(storage.KeyParentIDs, chain)
}

func (b *chkBoltRaw) putGarbage(name string) {
	// A kind of two bytes cannot be decoded.
	require.NoError(b.t, b.bucket(name).Put([]byte(storage.KeyKind), []byte("xx")))
}

func (b *chkBoltRaw) deleteRecord(name string) {
	require.NoError(b.t, b.snaps().DeleteBucket([]byte(name)))
}

func chkBoltLinkKey(parent, child uint64) []byte {
	k := binary.AppendUvarint(nil, parent)
	k = append(k, 0)
	return binary.AppendUvarint(k, child)
}

func (b *chkBoltRaw) putLink(_ string, parentID, child uint64, childName string) {
	require.NoError(b.t, b.parents().Put(chkBoltLinkKey(parentID, child), []byte(childName)))
}

func (b *chkBoltRaw) deleteLink(_ string, parentID, child uint64) {
	k := chkBoltLinkKey(parentID, child)
	require.NotNil(b.t, b.parents().Get(k), "no index entry %x", k)
	require.NoError(b.t, b.parents().Delete(k))
}

func (b *chkBoltRaw) putBadLink() {
	// A uvarint that never ends.
	require.NoError(b.t, b.parents().Put([]byte{0xff, 0xff}, []byte("x")))
}

func (b *chkBoltRaw) idLimit() uint64 { return b.snaps().Sequence() }

func (b *chkBoltRaw) setSequence(seq uint64) {
	require.NoError(b.t, b.snaps().SetSequence(seq))
}

// chkEtcdRaw edits an etcd root with the layout of keys.go.
type chkEtcdRaw struct {
	t      *testing.T
	cli    *clientv3.Client
	prefix string // <root>/storage.v1/
}

func (e *chkEtcdRaw) get(rel string) (value []byte, version int64, ok bool) {
	resp, err := e.cli.Get(context.Background(), e.prefix+rel)
	require.NoError(e.t, err)
	if len(resp.Kvs) == 0 {
		return nil, 0, false
	}
	return resp.Kvs[0].Value, resp.Kvs[0].Version, true
}

func (e *chkEtcdRaw) put(rel string, value []byte) {
	_, err := e.cli.Put(context.Background(), e.prefix+rel, string(value))
	require.NoError(e.t, err)
}

func (e *chkEtcdRaw) del(rel string) {
	resp, err := e.cli.Delete(context.Background(), e.prefix+rel)
	require.NoError(e.t, err)
	require.Equal(e.t, int64(1), resp.Deleted, "delete %q", rel)
}

func (e *chkEtcdRaw) snapKey(name string) string { return storage.KeyEtcdSnapshots + "/" + name }

func (e *chkEtcdRaw) record(name string) chkRecord {
	v, _, ok := e.get(e.snapKey(name))
	require.True(e.t, ok, "no record for %q", name)
	r, err := chkDecodeEtcdRecord(v)
	require.NoError(e.t, err, "record of %q", name)
	return r
}

func (e *chkEtcdRaw) setRecord(name string, r chkRecord) {
	e.put(e.snapKey(name), chkEncodeEtcdRecord(r))
}

func (e *chkEtcdRaw) putGarbage(name string) {
	e.put(e.snapKey(name), []byte("\x01\xff\xff"))
}

func (e *chkEtcdRaw) deleteRecord(name string) { e.del(e.snapKey(name)) }

// chkEscape is the documented escaping of a parent name in the children
// index: '%' and '/' percent-encoded.
func chkEscape(name string) string {
	return strings.NewReplacer("%", "%25", "/", "%2F").Replace(name)
}

func (e *chkEtcdRaw) linkKey(parent string, child uint64) string {
	return storage.KeyEtcdChildren + "/" + chkEscape(parent) + "/" + strconv.FormatUint(child, 10)
}

func (e *chkEtcdRaw) putLink(parent string, _, child uint64, childName string) {
	e.put(e.linkKey(parent, child), []byte(childName))
}

func (e *chkEtcdRaw) deleteLink(parent string, _, child uint64) {
	e.del(e.linkKey(parent, child))
}

func (e *chkEtcdRaw) putBadLink() {
	// '%zz' is no escape escapeName produces.
	e.put(storage.KeyEtcdChildren+"/a%zz/1", []byte("x"))
}

func (e *chkEtcdRaw) idLimit() uint64 {
	_, blocks, _ := e.get(storage.KeyEtcdIDBlock)
	var floor uint64
	if v, _, ok := e.get(storage.KeyEtcdIDFloor); ok {
		var err error
		floor, err = strconv.ParseUint(string(v), 10, 64)
		require.NoError(e.t, err)
	}
	return floor + uint64(blocks)*128
}

// chkDecodeEtcdRecord reads the head of a version 1 etcd record as keys.go
// and encodeRecord document it: version byte, uvarint ID, kind byte,
// length-prefixed parent, count-prefixed uvarint chain; the rest is kept.
func chkDecodeEtcdRecord(b []byte) (chkRecord, error) {
	if len(b) == 0 || b[0] != 1 {
		return chkRecord{}, fmt.Errorf("not a version 1 record: %x", b)
	}
	b = b[1:]
	uv := func() (uint64, error) {
		v, n := binary.Uvarint(b)
		if n <= 0 {
			return 0, fmt.Errorf("bad uvarint")
		}
		b = b[n:]
		return v, nil
	}
	var r chkRecord
	var err error
	if r.ID, err = uv(); err != nil {
		return r, err
	}
	if len(b) == 0 {
		return r, fmt.Errorf("no kind")
	}
	r.Kind, b = snapshots.Kind(b[0]), b[1:]
	n, err := uv()
	if err != nil || n > uint64(len(b)) {
		return r, fmt.Errorf("bad parent")
	}
	r.Parent, b = string(b[:n]), b[n:]
	if n, err = uv(); err != nil {
		return r, err
	}
	for range n {
		id, err := uv()
		if err != nil {
			return r, err
		}
		r.Chain = append(r.Chain, id)
	}
	r.tail = slices.Clone(b)
	return r, nil
}

func chkEncodeEtcdRecord(r chkRecord) []byte {
	b := []byte{1}
	b = binary.AppendUvarint(b, r.ID)
	b = append(b, byte(r.Kind))
	b = binary.AppendUvarint(b, uint64(len(r.Parent)))
	b = append(b, r.Parent...)
	b = binary.AppendUvarint(b, uint64(len(r.Chain)))
	for _, id := range r.Chain {
		b = binary.AppendUvarint(b, id)
	}
	return append(b, r.tail...)
}

// chkUpdate runs fn in a writable transaction and requires it to commit.
func chkUpdate(t *testing.T, ms storage.MetaStore, fn func(ctx context.Context) error) {
	t.Helper()
	require.NoError(t, ms.WithTransaction(context.Background(), true, fn))
}

// chkWithParent is the snapshots.Opt that rebases an active on commit.
func chkWithParent(parent string) snapshots.Opt {
	return func(info *snapshots.Info) error {
		info.Parent = parent
		return nil
	}
}

// chkBuildChain writes a realistic store in several transactions and returns
// every snapshot's ID:
//
//	base     committed                      labels
//	layer1   committed on base
//	layer2   committed on layer1
//	work     active on layer2               labels
//	view     view on layer1
//	rb       committed, created without a parent and rebased onto layer1
//	top      active on rb
//	lone-a   active, no parent
//	lone-b   view, no parent
//
// plus a snapshot created and removed, so IDs have a gap.
func chkBuildChain(t *testing.T, ms storage.MetaStore) map[string]uint64 {
	t.Helper()
	layer := func(ctx context.Context, name, parent string, opts ...snapshots.Opt) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name+"-active", parent); err != nil {
			return err
		}
		_, err := storage.CommitActive(ctx, name+"-active", name, snapshots.Usage{Inodes: 3, Size: 4096}, opts...)
		return err
	}
	chkUpdate(t, ms, func(ctx context.Context) error {
		return layer(ctx, "base", "", snapshots.WithLabels(map[string]string{"containerd.io/snapshot/layer": "sha256:00"}))
	})
	chkUpdate(t, ms, func(ctx context.Context) error {
		if err := layer(ctx, "layer1", "base"); err != nil {
			return err
		}
		return layer(ctx, "layer2", "layer1")
	})
	chkUpdate(t, ms, func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "work", "layer2",
			snapshots.WithLabels(map[string]string{"app": "web"})); err != nil {
			return err
		}
		_, err := storage.CreateSnapshot(ctx, snapshots.KindView, "view", "layer1")
		return err
	})
	chkUpdate(t, ms, func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "rb-active", ""); err != nil {
			return err
		}
		if _, err := storage.CommitActive(ctx, "rb-active", "rb", snapshots.Usage{Size: 1}, chkWithParent("layer1")); err != nil {
			return err
		}
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "top", "rb")
		return err
	})
	chkUpdate(t, ms, func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "lone-a", ""); err != nil {
			return err
		}
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindView, "lone-b", ""); err != nil {
			return err
		}
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "tmp", "layer2"); err != nil {
			return err
		}
		_, _, err := storage.Remove(ctx, "tmp")
		return err
	})

	ids := map[string]uint64{}
	require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		m, err := storage.IDMap(ctx)
		if err != nil {
			return err
		}
		for id, name := range m {
			n, err := strconv.ParseUint(id, 10, 64)
			require.NoError(t, err)
			ids[name] = n
		}
		top, err := storage.GetSnapshot(ctx, "top")
		require.NoError(t, err)
		assert.Equal(t, []string{chkID(ids["rb"]), chkID(ids["layer1"]), chkID(ids["base"])}, top.ParentIDs, "rebased chain")
		return nil
	}))
	require.Len(t, ids, 9)
	return ids
}

func chkID(id uint64) string { return strconv.FormatUint(id, 10) }

// chkWant is one problem Check must report: the snapshot it names and a
// substring of its detail.
type chkWant struct {
	snapshot string
	detail   string
}

// chkAssertProblems checks that got holds exactly the problems of want:
// every wanted problem is reported, and nothing else is.
func chkAssertProblems(t *testing.T, got []storage.Problem, want []chkWant) {
	t.Helper()
	matches := func(p storage.Problem, w chkWant) bool {
		return p.Snapshot == w.snapshot && strings.Contains(p.Detail, w.detail)
	}
	for _, w := range want {
		found := slices.ContainsFunc(got, func(p storage.Problem) bool { return matches(p, w) })
		assert.True(t, found, "Check did not report %q: %q\ngot:\n%s", w.snapshot, w.detail, chkList(got))
	}
	for _, p := range got {
		expected := slices.ContainsFunc(want, func(w chkWant) bool { return matches(p, w) })
		assert.True(t, expected, "Check reported an unexpected problem %s\ngot:\n%s", p, chkList(got))
	}
}

func chkList(ps []storage.Problem) string {
	var b strings.Builder
	for _, p := range ps {
		fmt.Fprintf(&b, "  %s\n", p)
	}
	return b.String()
}

func chkCheck(t *testing.T, ms storage.MetaStore) []storage.Problem {
	t.Helper()
	problems, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	again, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	assert.Equal(t, problems, again, "Check's order must be stable")
	return problems
}

func TestCheckCleanStoreHasNoProblems(t *testing.T) {
	for _, eng := range chkEngines() {
		t.Run(eng.name, func(t *testing.T) {
			s := eng.fresh(t)
			assert.Empty(t, chkCheck(t, s.ms), "empty store")
			chkBuildChain(t, s.ms)
			assert.Empty(t, chkCheck(t, s.ms), "realistic chain")
			s.reopen(t)
			assert.Empty(t, chkCheck(t, s.ms), "after reopening")

			// Everything removed again, leaves first.
			for _, name := range []string{"top", "rb", "view", "work", "layer2", "layer1", "base", "lone-a", "lone-b"} {
				chkUpdate(t, s.ms, func(ctx context.Context) error { _, _, err := storage.Remove(ctx, name); return err })
			}
			assert.Empty(t, chkCheck(t, s.ms), "emptied store")
		})
	}
}

// chkCorruption is one corruption injected through the raw engine and the
// problems Check must report for it.
type chkCorruption struct {
	name string
	only string // engine name; empty for both
	// before runs on the raw engine of the empty store, before the chain is
	// built.
	before func(t *testing.T, r chkRaw)
	// corrupt runs on the raw engine of the built store; limit is idLimit.
	corrupt func(t *testing.T, r chkRaw, ids map[string]uint64)
	want    func(engine string, ids map[string]uint64, limit uint64) []chkWant
}

func chkCorruptions() []chkCorruption {
	setRecord := func(r chkRaw, name string, edit func(rec *chkRecord)) {
		rec := r.record(name)
		edit(&rec)
		r.setRecord(name, rec)
	}
	// describeParent is how Check names the parent of an index entry:
	// bbolt keys the index by ID, etcd by name.
	describeParent := func(engine, name string, id uint64) string {
		if engine == "bolt" {
			return fmt.Sprintf("to parent ID %d,", id)
		}
		return fmt.Sprintf("to parent %q,", name)
	}
	return []chkCorruption{
		{
			name: "parent missing: record names a snapshot that does not exist",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				setRecord(r, "work", func(rec *chkRecord) { rec.Parent = "ghost" })
			},
			want: func(engine string, ids map[string]uint64, _ uint64) []chkWant {
				return []chkWant{
					{"work", `parent "ghost" does not exist`},
					// The index still links work under layer2.
					{"work", fmt.Sprintf("children index links it (ID %d) %s but no record has that parent link", ids["work"], describeParent(engine, "layer2", ids["layer2"]))},
				}
			},
		},
		{
			name: "parent missing: parent record deleted under its child",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				r.deleteRecord("layer2")
			},
			want: func(engine string, ids map[string]uint64, _ uint64) []chkWant {
				return []chkWant{
					{"work", `parent "layer2" does not exist`},
					{"work", fmt.Sprintf("children index links it (ID %d) %s", ids["work"], describeParent(engine, "layer2", ids["layer2"]))},
					{"layer2", fmt.Sprintf("children index links it (ID %d) %s", ids["layer2"], describeParent(engine, "layer1", ids["layer1"]))},
				}
			},
		},
		{
			name: "parent not committed",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				setRecord(r, "layer2", func(rec *chkRecord) { rec.Kind = snapshots.KindActive })
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				return []chkWant{{"work", `parent "layer2" is Active, not committed`}}
			},
		},
		{
			name: "parent is a view",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				setRecord(r, "rb", func(rec *chkRecord) { rec.Kind = snapshots.KindView })
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				return []chkWant{{"top", `parent "rb" is View, not committed`}}
			},
		},
		{
			name: "missing children-index entry",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				r.deleteLink("layer2", ids["layer2"], ids["work"])
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				return []chkWant{{"work", `missing from the children index of its parent "layer2"`}}
			},
		},
		{
			name: "missing children-index entry of a rebased snapshot",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				r.deleteLink("layer1", ids["layer1"], ids["rb"])
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				return []chkWant{{"rb", `missing from the children index of its parent "layer1"`}}
			},
		},
		{
			name: "dangling index entry: no such child",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				r.putLink("layer2", ids["layer2"], 999999, "ghost-child")
			},
			want: func(engine string, ids map[string]uint64, _ uint64) []chkWant {
				return []chkWant{{"ghost-child", fmt.Sprintf("children index links it (ID 999999) %s but no record has that parent link", describeParent(engine, "layer2", ids["layer2"]))}}
			},
		},
		{
			name: "extra index entry: child linked under a second parent",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				r.putLink("base", ids["base"], ids["work"], "work")
			},
			want: func(engine string, ids map[string]uint64, _ uint64) []chkWant {
				return []chkWant{{"work", fmt.Sprintf("children index links it (ID %d) %s but no record has that parent link", ids["work"], describeParent(engine, "base", ids["base"]))}}
			},
		},
		{
			name: "extra index entry: parent does not exist",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				r.putLink("ghost", 424242, ids["lone-a"], "lone-a")
			},
			want: func(engine string, ids map[string]uint64, _ uint64) []chkWant {
				return []chkWant{{"lone-a", fmt.Sprintf("children index links it (ID %d) %s", ids["lone-a"], describeParent(engine, "ghost", 424242))}}
			},
		},
		{
			name: "index entry names the wrong child",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				r.putLink("layer2", ids["layer2"], ids["work"], "someone-else")
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				return []chkWant{{"work", `children index names the child "someone-else"`}}
			},
		},
		{
			name: "duplicate ID",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				setRecord(r, "lone-b", func(rec *chkRecord) { rec.ID = ids["lone-a"] })
			},
			want: func(_ string, ids map[string]uint64, _ uint64) []chkWant {
				return []chkWant{{"lone-a", fmt.Sprintf(`ID %d is shared with ["lone-b"]`, ids["lone-a"])}}
			},
		},
		{
			name: "duplicate ID of a parent with children",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				// work takes layer1's ID; its index entry still has its own.
				setRecord(r, "work", func(rec *chkRecord) { rec.ID = ids["layer1"] })
			},
			want: func(engine string, ids map[string]uint64, _ uint64) []chkWant {
				return []chkWant{
					{"layer1", fmt.Sprintf(`ID %d is shared with ["work"]`, ids["layer1"])},
					{"work", fmt.Sprintf("children index links it (ID %d) %s", ids["work"], describeParent(engine, "layer2", ids["layer2"]))},
					{"work", `missing from the children index of its parent "layer2"`},
				}
			},
		},
		{
			name: "stored chain differs from the followed chain",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				setRecord(r, "work", func(rec *chkRecord) { rec.Chain = []uint64{ids["layer2"], ids["base"]} })
			},
			want: func(_ string, ids map[string]uint64, _ uint64) []chkWant {
				return []chkWant{{"work", fmt.Sprintf("stored parent chain [%d %d] differs from the followed chain [%d %d %d]",
					ids["layer2"], ids["base"], ids["layer2"], ids["layer1"], ids["base"])}}
			},
		},
		{
			name: "stored chain of a rebased snapshot is the pre-rebase one",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				setRecord(r, "top", func(rec *chkRecord) { rec.Chain = []uint64{ids["rb"]} })
			},
			want: func(_ string, ids map[string]uint64, _ uint64) []chkWant {
				return []chkWant{{"top", fmt.Sprintf("stored parent chain [%d] differs from the followed chain [%d %d %d]",
					ids["rb"], ids["rb"], ids["layer1"], ids["base"])}}
			},
		},
		{
			name: "stored chain without a parent",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				setRecord(r, "lone-a", func(rec *chkRecord) { rec.Chain = []uint64{ids["base"]} })
			},
			want: func(_ string, ids map[string]uint64, _ uint64) []chkWant {
				return []chkWant{{"lone-a", fmt.Sprintf("has no parent but stores parent chain [%d]", ids["base"])}}
			},
		},
		{
			name: "parent cycle in records without stored chains (containerd-written)",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				// base and layer1 point at each other; neither stores a
				// chain, as containerd writes them; the index matches the
				// parent links, so only the cycle is wrong.
				setRecord(r, "base", func(rec *chkRecord) { rec.Parent, rec.Chain = "layer1", nil })
				setRecord(r, "layer1", func(rec *chkRecord) { rec.Chain = nil })
				r.putLink("layer1", ids["layer1"], ids["base"], "base")
				for _, name := range []string{"layer2", "work", "view", "rb", "top"} {
					setRecord(r, name, func(rec *chkRecord) { rec.Chain = nil })
				}
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				var w []chkWant
				for _, name := range []string{"base", "layer1", "layer2", "work", "view", "rb", "top"} {
					w = append(w, chkWant{name, "parent chain cannot be followed"})
				}
				return w
			},
		},
		{
			name: "record does not decode",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				r.putGarbage("lone-a")
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				return []chkWant{{"lone-a", "record does not decode"}}
			},
		},
		{
			name: "parent record does not decode",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				r.putGarbage("rb")
			},
			want: func(engine string, ids map[string]uint64, _ uint64) []chkWant {
				return []chkWant{
					{"rb", "record does not decode"},
					{"rb", fmt.Sprintf("children index links it (ID %d) %s", ids["rb"], describeParent(engine, "layer1", ids["layer1"]))},
					{"top", `parent "rb" does not exist`},
					{"top", fmt.Sprintf("children index links it (ID %d) %s", ids["top"], describeParent(engine, "rb", ids["rb"]))},
				}
			},
		},
		{
			name: "unknown kind",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				setRecord(r, "lone-a", func(rec *chkRecord) { rec.Kind = 42 })
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				return []chkWant{{"lone-a", "unknown kind 42"}}
			},
		},
		{
			name: "ID above the allocator's limit",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				setRecord(r, "lone-a", func(rec *chkRecord) { rec.ID = r.idLimit() + 1 })
			},
			want: func(_ string, _ map[string]uint64, limit uint64) []chkWant {
				return []chkWant{{"lone-a", fmt.Sprintf("ID %d is outside what the allocator handed out (1..%d)", limit+1, limit)}}
			},
		},
		{
			name: "ID zero",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				setRecord(r, "lone-b", func(rec *chkRecord) { rec.ID = 0 })
			},
			want: func(_ string, _ map[string]uint64, limit uint64) []chkWant {
				return []chkWant{{"lone-b", fmt.Sprintf("ID 0 is outside what the allocator handed out (1..%d)", limit)}}
			},
		},
		{
			name: "bucket sequence lowered below the highest ID",
			only: "bolt",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				r.(*chkBoltRaw).setSequence(chkMaxID(ids) - 1)
			},
			want: func(_ string, ids map[string]uint64, _ uint64) []chkWant {
				top := chkMaxID(ids)
				return []chkWant{{chkNameOf(ids, top), fmt.Sprintf("ID %d is outside what the allocator handed out (1..%d)", top, top-1)}}
			},
		},
		{
			name: "ids/block deleted: its version restarts",
			only: "etcd",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				r.(*chkEtcdRaw).del(storage.KeyEtcdIDBlock)
			},
			want: func(_ string, ids map[string]uint64, _ uint64) []chkWant {
				var w []chkWant
				for name, id := range ids {
					w = append(w, chkWant{name, fmt.Sprintf("ID %d is outside what the allocator handed out (1..0)", id)})
				}
				return w
			},
		},
		{
			name: "ids/floor lowered after an import raised it",
			only: "etcd",
			before: func(t *testing.T, r chkRaw) {
				r.(*chkEtcdRaw).put(storage.KeyEtcdIDFloor, []byte("1000"))
			},
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				for name, id := range ids {
					require.Greater(t, id, uint64(1000), "%s was given an ID under the floor", name)
				}
				r.(*chkEtcdRaw).put(storage.KeyEtcdIDFloor, []byte("0"))
			},
			want: func(_ string, ids map[string]uint64, _ uint64) []chkWant {
				var w []chkWant
				for name, id := range ids {
					w = append(w, chkWant{name, fmt.Sprintf("ID %d is outside what the allocator handed out (1..128)", id)})
				}
				return w
			},
		},
		{
			// The children check seeks the canonical key of the parent's ID;
			// 0x81 0x00 also decodes as 1, but no seek finds it, so Remove
			// of the parent would orphan the child.
			name: "parents key with a non-canonical varint",
			only: "bolt",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				r.deleteLink("base", ids["base"], ids["layer1"])
				k := append(chkNonCanonicalUvarint(ids["base"]), 0)
				k = binary.AppendUvarint(k, ids["layer1"])
				require.NoError(t, r.(*chkBoltRaw).parents().Put(k, []byte("layer1")))
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				return []chkWant{
					{"layer1", "children index entry does not decode"},
					{"layer1", `missing from the children index of its parent "base"`},
				}
			},
		},
		{
			name: "children key with a non-canonical child ID",
			only: "etcd",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				e := r.(*chkEtcdRaw)
				e.deleteLink("layer2", ids["layer2"], ids["work"])
				e.put(storage.KeyEtcdChildren+"/layer2/0"+chkID(ids["work"]), []byte("work"))
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				return []chkWant{
					{"work", "children index entry does not decode"},
					{"work", `missing from the children index of its parent "layer2"`},
				}
			},
		},
		{
			name: "snapshots bucket replaced by a plain key",
			only: "bolt",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				chkReplaceBucketByKey(t, r.(*chkBoltRaw).tx.Bucket([]byte(storage.KeyVersion)), storage.KeySnapshots)
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				return []chkWant{{"", `"v1/snapshots" is a plain key, not a bucket`}}
			},
		},
		{
			name: "parents bucket replaced by a plain key",
			only: "bolt",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				chkReplaceBucketByKey(t, r.(*chkBoltRaw).tx.Bucket([]byte(storage.KeyVersion)), storage.KeyParents)
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				return []chkWant{{"", `"v1/parents" is a plain key, not a bucket`}}
			},
		},
		{
			name: "a snapshot's bucket replaced by a plain key",
			only: "bolt",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				chkReplaceBucketByKey(t, r.(*chkBoltRaw).snaps(), "lone-a")
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				return []chkWant{{"lone-a", "a plain key, not a bucket"}}
			},
		},
		{
			name: "a snapshot's labels bucket replaced by a plain key",
			only: "bolt",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				chkReplaceBucketByKey(t, r.(*chkBoltRaw).bucket("work"), storage.KeyLabels)
			},
			want: func(engine string, ids map[string]uint64, _ uint64) []chkWant {
				return []chkWant{
					{"work", `record does not decode: bad "labels"`},
					{"work", fmt.Sprintf("children index links it (ID %d) %s", ids["work"], describeParent(engine, "layer2", ids["layer2"]))},
				}
			},
		},
		{
			// A record like lone-a's, with an ID of its own, under
			// "<root>/storage.v1/snapshots/" exactly: no lookup reaches it.
			name: "record under the empty name",
			only: "etcd",
			corrupt: func(t *testing.T, r chkRaw, ids map[string]uint64) {
				rec := r.record("lone-a")
				rec.ID = r.idLimit()
				require.Empty(t, chkNameOf(ids, rec.ID), "the ID must be free")
				r.setRecord("", rec)
			},
			want: func(string, map[string]uint64, uint64) []chkWant {
				return []chkWant{{"", "name must not be empty"}}
			},
		},
	}
}

// chkNonCanonicalUvarint encodes x as a uvarint one byte longer than
// needed: a continuation bit on the last byte, then a zero byte.
func chkNonCanonicalUvarint(x uint64) []byte {
	b := binary.AppendUvarint(nil, x)
	b[len(b)-1] |= 0x80
	return append(b, 0)
}

// chkReplaceBucketByKey puts a plain key where the bucket name of parent
// was.
func chkReplaceBucketByKey(t *testing.T, parent *bolt.Bucket, name string) {
	t.Helper()
	require.NotNil(t, parent)
	require.NotNil(t, parent.Bucket([]byte(name)), "no bucket %q to replace", name)
	require.NoError(t, parent.DeleteBucket([]byte(name)))
	require.NoError(t, parent.Put([]byte(name), []byte("not a bucket")))
}

func chkMaxID(ids map[string]uint64) uint64 {
	var top uint64
	for _, id := range ids {
		top = max(top, id)
	}
	return top
}

func chkNameOf(ids map[string]uint64, id uint64) string {
	for name, v := range ids {
		if v == id {
			return name
		}
	}
	return ""
}

func TestCheckReportsEachCorruption(t *testing.T) {
	for _, eng := range chkEngines() {
		t.Run(eng.name, func(t *testing.T) {
			for _, c := range chkCorruptions() {
				if c.only != "" && c.only != eng.name {
					continue
				}
				t.Run(c.name, func(t *testing.T) {
					s := eng.fresh(t)
					if c.before != nil {
						s.raw(t, func(r chkRaw) { c.before(t, r) })
					}
					ids := chkBuildChain(t, s.ms)
					require.Empty(t, chkCheck(t, s.ms), "the store is clean before the corruption")
					var limit uint64
					s.raw(t, func(r chkRaw) {
						limit = r.idLimit()
						c.corrupt(t, r, ids)
					})
					got := chkCheck(t, s.ms)
					chkAssertProblems(t, got, c.want(eng.name, ids, limit))
					// Check's bounds change nothing it reports (see
					// check_bounds_test.go).
					assert.Equal(t, got, chkCheckShrunk(t, s.ms), "within shrunk bounds")
				})
			}
		})
	}
}

// A malformed children-index key (one no engine writes) must not go
// unnoticed: Check either reports it or fails with class DataLoss; it
// never panics and never passes the store as clean.
func TestCheckMalformedIndexKey(t *testing.T) {
	for _, eng := range chkEngines() {
		t.Run(eng.name, func(t *testing.T) {
			s := eng.fresh(t)
			chkBuildChain(t, s.ms)
			s.raw(t, func(r chkRaw) { r.putBadLink() })
			problems, err := storage.Check(context.Background(), s.ms)
			if err != nil {
				assert.True(t, errdefs.IsDataLoss(err), "got %v", err)
				assert.ErrorIs(t, err, storage.ErrCorrupt)
				return
			}
			assert.NotEmpty(t, problems, "a malformed index key passed as clean")
		})
	}
}

// A corrupt ID floor (etcd) makes the allocator unusable; Check says so
// with class DataLoss, as an error or a problem.
func TestCheckCorruptIDFloor(t *testing.T) {
	s := chkFreshEtcd(t)
	chkBuildChain(t, s.ms)
	s.raw(t, func(r chkRaw) { r.(*chkEtcdRaw).put(storage.KeyEtcdIDFloor, []byte("not a number")) })
	problems, err := storage.Check(context.Background(), s.ms)
	if err != nil {
		assert.True(t, errdefs.IsDataLoss(err), "got %v", err)
		return
	}
	assert.NotEmpty(t, problems, "a corrupt ID floor passed as clean")
}

// chkForeignStore is a MetaStore from outside this package.
type chkForeignStore struct{ rolledBack bool }

type chkForeignTx struct {
	storage.Transactor // nil: any call but Rollback panics
	s                  *chkForeignStore
}

func (t chkForeignTx) Rollback() error { t.s.rolledBack = true; return nil }

func (s *chkForeignStore) TransactionContext(ctx context.Context, _ bool) (context.Context, storage.Transactor, error) {
	tx := chkForeignTx{s: s}
	return storage.ContextWithTransactor(ctx, tx), tx, nil
}

func (s *chkForeignStore) WithTransaction(ctx context.Context, writable bool, fn storage.TransactionCallback) error {
	ctx, tx, _ := s.TransactionContext(ctx, writable)
	defer tx.Rollback()
	return fn(ctx)
}

func (s *chkForeignStore) Close() error { return nil }

// chkWrappedStore wraps a store of this package, as a driver might (for
// metrics, say); Check sees through it because its transactions are the
// package's own.
type chkWrappedStore struct{ storage.MetaStore }

func TestCheckOnForeignStoreIsNotImplemented(t *testing.T) {
	foreign := &chkForeignStore{}
	problems, err := storage.Check(context.Background(), foreign)
	assert.Nil(t, problems)
	assert.True(t, errdefs.IsNotImplemented(err), "got %v", err)
	assert.True(t, foreign.rolledBack, "Check must end the transaction it started")

	ms := openBolt(t, t.TempDir())
	chkBuildChain(t, ms)
	problems, err = storage.Check(context.Background(), chkWrappedStore{ms})
	assert.NoError(t, err)
	assert.Empty(t, problems)
}

func TestCheckRefusesClosedStoreAndCanceledContext(t *testing.T) {
	for _, eng := range chkEngines() {
		t.Run(eng.name, func(t *testing.T) {
			s := eng.fresh(t)
			chkBuildChain(t, s.ms)

			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			problems, err := storage.Check(ctx, s.ms)
			assert.Nil(t, problems)
			assert.True(t, errdefs.IsCanceled(err), "got %v", err)

			require.NoError(t, s.ms.Close())
			problems, err = storage.Check(context.Background(), s.ms)
			assert.Nil(t, problems)
			assert.ErrorIs(t, err, storage.ErrClosed)
			assert.True(t, errdefs.IsFailedPrecondition(err), "got %v", err)
		})
	}
}
