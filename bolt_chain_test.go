package storage_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/snapmeta/storage"
)

// deepChain commits a chain of depth layers ("c0000" the base) and an
// active on top, and returns the top's expected ParentIDs.
func deepChain(t *testing.T, ms storage.MetaStore, depth int) []string {
	t.Helper()
	var ids []string
	update(t, ms, func(ctx context.Context) error {
		ids = ids[:0]
		parent := ""
		for i := range depth {
			name := fmt.Sprintf("c%04d", i)
			if err := commitLayer(ctx, name, parent); err != nil {
				return err
			}
			id, _, _, err := storage.GetInfo(ctx, name)
			if err != nil {
				return err
			}
			ids = append(ids, id)
			parent = name
		}
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "top", parent)
		return err
	})
	slices.Reverse(ids)
	return ids
}

// rawChains returns, per snapshot, how many IDs its record stores
// (parentids or chainpiece) and the ancestor its chainpiece goes on from.
func rawChains(t *testing.T, file string) (stored map[string]int, from map[string]string) {
	t.Helper()
	db, err := bolt.Open(file, 0o600, &bolt.Options{ReadOnly: true})
	require.NoError(t, err)
	defer db.Close()
	stored, from = map[string]int{}, map[string]string{}
	require.NoError(t, db.View(func(tx *bolt.Tx) error {
		snaps := tx.Bucket([]byte(storage.KeyVersion)).Bucket([]byte(storage.KeySnapshots))
		return snaps.ForEachBucket(func(k []byte) error {
			sb := snaps.Bucket(k)
			v := sb.Get([]byte(storage.KeyParentIDs))
			if p := sb.Get([]byte(storage.KeyChainPiece)); p != nil {
				var f string
				f, v = splitChainPiece(t, p)
				from[string(k)] = f
			}
			for len(v) > 0 {
				_, n := binary.Uvarint(v)
				v = v[n:]
				stored[string(k)]++
			}
			return nil
		})
	}))
	return stored, from
}

// splitChainPiece splits a chainpiece value into the ancestor it goes on
// from and its IDs, still encoded.
func splitChainPiece(t *testing.T, v []byte) (string, []byte) {
	l, k := binary.Uvarint(v)
	require.Positive(t, k)
	return string(v[k : k+int(l)]), v[k+int(l):]
}

func chainPiece(from string, ids []byte) []byte {
	return append(append(binary.AppendUvarint(nil, uint64(len(from))), from...), ids...)
}

func TestBoltDeepChainsAreStoredInPiecesAndReadWhole(t *testing.T) {
	dir := t.TempDir()
	ms := openBolt(t, dir)
	want := deepChain(t, ms, 300)
	require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		s, err := storage.GetSnapshot(ctx, "top")
		require.NoError(t, err)
		assert.Equal(t, want, s.ParentIDs, "the whole chain, immediate parent first")
		return nil
	}))
	requireCheckClean(t, ms)
	require.NoError(t, ms.Close())

	stored, from := rawChains(t, filepath.Join(dir, "metadata.db"))
	for name, n := range stored {
		assert.LessOrEqual(t, n, 128, "IDs stored by %q", name)
	}
	// The layer at depth 129 (c0129, 129 parents) starts a piece of its own.
	assert.Equal(t, 1, stored["c0129"])
	assert.Equal(t, "c0128", from["c0129"])
	assert.Equal(t, 128, stored["c0128"], "at depth 128 the chain is whole")
	assert.Empty(t, from["c0128"])
	assert.Equal(t, 2, stored["c0130"], "pieces grow by one")
	assert.Equal(t, "c0128", from["c0130"])
	assert.Equal(t, 32, stored["c0160"], "up to 32")
	assert.Equal(t, 1, stored["c0161"], "then a new one starts")
	assert.Equal(t, "c0160", from["c0161"])
	assert.Equal(t, (300-129)%32+1, stored["top"])
	assert.Equal(t, "c0288", from["top"])
}

func requireCheckClean(t *testing.T, ms storage.MetaStore) {
	t.Helper()
	problems, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	require.Empty(t, problems)
}

// TestBoltWholeDeepChainsOfOlderFilesStillWork: a file written before
// pieces stores deep chains whole; it reads and checks as before, and new
// children of such records keep whole chains.
func TestBoltWholeDeepChainsOfOlderFilesStillWork(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "metadata.db")
	ms := openBolt(t, dir)
	want := deepChain(t, ms, 200)
	require.NoError(t, ms.Close())
	// Rewrite every piece as the whole chain, as older versions stored it.
	db, err := bolt.Open(file, 0o600, nil)
	require.NoError(t, err)
	require.NoError(t, db.Update(func(tx *bolt.Tx) error {
		snaps := tx.Bucket([]byte(storage.KeyVersion)).Bucket([]byte(storage.KeySnapshots))
		ids := map[string]uint64{}
		parents := map[string]string{}
		require.NoError(t, snaps.ForEachBucket(func(k []byte) error {
			sb := snaps.Bucket(k)
			ids[string(k)], _ = binary.Uvarint(sb.Get([]byte(storage.KeyID)))
			parents[string(k)] = string(sb.Get([]byte(storage.KeyParent)))
			return nil
		}))
		for name := range ids {
			sb := snaps.Bucket([]byte(name))
			if sb.Get([]byte(storage.KeyChainPiece)) == nil {
				continue
			}
			var chain []byte
			for p := parents[name]; p != ""; p = parents[p] {
				chain = binary.AppendUvarint(chain, ids[p])
			}
			require.NoError(t, sb.Delete([]byte(storage.KeyChainPiece)))
			require.NoError(t, sb.Put([]byte(storage.KeyParentIDs), chain))
		}
		return nil
	}))
	require.NoError(t, db.Close())

	ms = openBolt(t, dir)
	requireCheckClean(t, ms)
	update(t, ms, func(ctx context.Context) error {
		s, err := storage.GetSnapshot(ctx, "top")
		require.NoError(t, err)
		assert.Equal(t, want, s.ParentIDs)
		if err := commitLayer(ctx, "more", "c0199"); err != nil {
			return err
		}
		_, err = storage.CreateSnapshot(ctx, snapshots.KindView, "more-view", "more")
		return err
	})
	requireCheckClean(t, ms)
	require.NoError(t, ms.Close())
	stored, from := rawChains(t, file)
	assert.Equal(t, 200, stored["more"], "a child of a whole deep chain stores its chain whole")
	assert.Empty(t, from["more"])
	assert.Equal(t, 201, stored["more-view"])
}

// TestBoltDamagedChainPiecesAreFound: Check reports a piece that does not
// match its parent's, and a read that cannot put a chain together fails
// with DataLoss rather than returning a short chain.
func TestBoltDamagedChainPiecesAreFound(t *testing.T) {
	for _, tc := range []struct {
		name   string
		damage func(sb *bolt.Bucket) error
		read   bool // GetSnapshot of top fails
	}{
		{"an ID of a piece changed", func(sb *bolt.Bucket) error {
			from, ids := splitChainPiece(t, sb.Get([]byte(storage.KeyChainPiece)))
			_, n := binary.Uvarint(ids)
			return sb.Put([]byte(storage.KeyChainPiece), chainPiece(from, append(binary.AppendUvarint(nil, 999999), ids[n:]...)))
		}, false},
		{"the piece goes on from a missing snapshot", func(sb *bolt.Bucket) error {
			_, ids := splitChainPiece(t, sb.Get([]byte(storage.KeyChainPiece)))
			return sb.Put([]byte(storage.KeyChainPiece), chainPiece("nowhere", slices.Clone(ids)))
		}, true},
		{"a piece without IDs", func(sb *bolt.Bucket) error {
			from, _ := splitChainPiece(t, sb.Get([]byte(storage.KeyChainPiece)))
			return sb.Put([]byte(storage.KeyChainPiece), chainPiece(from, nil))
		}, true},
		{"the piece goes on from another ancestor", func(sb *bolt.Bucket) error {
			_, ids := splitChainPiece(t, sb.Get([]byte(storage.KeyChainPiece)))
			return sb.Put([]byte(storage.KeyChainPiece), chainPiece("c0010", slices.Clone(ids)))
		}, true},
		{"a piece and a whole chain", func(sb *bolt.Bucket) error {
			return sb.Put([]byte(storage.KeyParentIDs), binary.AppendUvarint(nil, 5))
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			ms := openBolt(t, dir)
			deepChain(t, ms, 140)
			require.NoError(t, ms.Close())
			db, err := bolt.Open(filepath.Join(dir, "metadata.db"), 0o600, nil)
			require.NoError(t, err)
			require.NoError(t, db.Update(func(tx *bolt.Tx) error {
				return tc.damage(tx.Bucket([]byte(storage.KeyVersion)).Bucket([]byte(storage.KeySnapshots)).Bucket([]byte("top")))
			}))
			require.NoError(t, db.Close())

			ms = openBolt(t, dir)
			problems, err := storage.Check(context.Background(), ms)
			require.NoError(t, err)
			require.NotEmpty(t, problems)
			assert.Equal(t, "top", problems[0].Snapshot, "%v", problems)
			err = ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
				_, err := storage.GetSnapshot(ctx, "top")
				return err
			})
			if tc.read {
				assert.True(t, errdefs.IsDataLoss(err), "got %v", err)
			}
		})
	}
}
