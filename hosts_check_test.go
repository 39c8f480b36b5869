package storage_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// This file proves Check across the scopes of a host-scoped root (issue
// 13): each corruption of what ties scopes together, written by hand with
// a raw etcd client in the layout of keys.go, is reported, with the host
// whose scope it concerns.

// hcLayer is a shared layer's record, as encodeLayer writes it: version 1,
// length-prefixed content key, count-prefixed uvarint parent chain, varint
// inodes and size, count-prefixed references (host, name), each
// length-prefixed.
type hcLayer struct {
	Content      string
	Chain        []uint64
	Inodes, Size int64
	Refs         [][2]string
}

func hcDecodeLayer(t testing.TB, b []byte) hcLayer {
	t.Helper()
	require.NotEmpty(t, b)
	require.Equal(t, byte(1), b[0], "layer version")
	b = b[1:]
	uv := func() uint64 {
		v, n := binary.Uvarint(b)
		require.Positive(t, n)
		b = b[n:]
		return v
	}
	v := func() int64 {
		x, n := binary.Varint(b)
		require.Positive(t, n)
		b = b[n:]
		return x
	}
	str := func() string {
		n := uv()
		s := string(b[:n])
		b = b[n:]
		return s
	}
	l := hcLayer{Content: str()}
	for range uv() {
		l.Chain = append(l.Chain, uv())
	}
	l.Inodes, l.Size = v(), v()
	for range uv() {
		h := str()
		l.Refs = append(l.Refs, [2]string{h, str()})
	}
	require.Empty(t, b, "trailing bytes")
	return l
}

func hcEncodeLayer(l hcLayer) []byte {
	str := func(b []byte, s string) []byte { return append(binary.AppendUvarint(b, uint64(len(s))), s...) }
	b := str([]byte{1}, l.Content)
	b = binary.AppendUvarint(b, uint64(len(l.Chain)))
	for _, id := range l.Chain {
		b = binary.AppendUvarint(b, id)
	}
	b = binary.AppendVarint(b, l.Inodes)
	b = binary.AppendVarint(b, l.Size)
	b = binary.AppendUvarint(b, uint64(len(l.Refs)))
	for _, r := range l.Refs {
		b = str(str(b, r[0]), r[1])
	}
	return b
}

// hcFixture is a host-scoped root: a commits shared layers base and top
// (on base) and a lonely one, an active on top and an unshared layer; b
// binds base and top and has a layer of its own.
type hcFixture struct {
	root string
	a    storage.MetaStore
	raw  *chkEtcdRaw
	ids  map[string]string // by host/name
}

func newHCFixture(t *testing.T) *hcFixture {
	t.Helper()
	f := &hcFixture{root: uniqueRoot(t), ids: map[string]string{}}
	f.a = hostStore(t, f.root, "a")
	b := hostStore(t, f.root, "b")
	update(t, f.a, func(ctx context.Context) (err error) {
		if f.ids["a/base"], err = commitShared(ctx, "base", "", "chain-base"); err != nil {
			return err
		}
		if f.ids["a/top"], err = commitShared(ctx, "top", "base", "chain-top"); err != nil {
			return err
		}
		if f.ids["a/lonely"], err = commitShared(ctx, "lonely", "", "chain-lonely"); err != nil {
			return err
		}
		s, err := createActive(ctx, "work", "top", nil)
		f.ids["a/work"] = s.ID
		if err != nil {
			return err
		}
		return commitLayer(ctx, "plain", "")
	})
	update(t, b, func(ctx context.Context) error {
		if _, err := storage.BindLayer(ctx, "base", "", "chain-base"); err != nil {
			return err
		}
		if _, err := storage.BindLayer(ctx, "top", "base", "chain-top"); err != nil {
			return err
		}
		return commitLayer(ctx, "own", "")
	})
	require.NoError(t, f.a.WithTransaction(context.Background(), false, func(ctx context.Context) (err error) {
		f.ids["a/plain"], _, _, err = storage.GetInfo(ctx, "plain")
		return err
	}))
	f.raw = &chkEtcdRaw{t: t, cli: etcdServer(t).Client(t), prefix: f.root + "/" + storage.KeyEtcdVersion + "/"}
	return f
}

func (f *hcFixture) layerKey(name string) string { return storage.KeyEtcdLayers + "/" + f.ids[name] }

func (f *hcFixture) layer(name string) hcLayer {
	v, _, ok := f.raw.get(f.layerKey(name))
	require.True(f.raw.t, ok, "layer of %s", name)
	return hcDecodeLayer(f.raw.t, v)
}

func (f *hcFixture) setLayer(name string, l hcLayer) { f.raw.put(f.layerKey(name), hcEncodeLayer(l)) }

func (f *hcFixture) recordKey(host, name string) string {
	return storage.KeyEtcdScopes + "/" + host + "/" + storage.KeyEtcdSnapshots + "/" + name
}

func (f *hcFixture) contentKey(content, layer string) string {
	return storage.KeyEtcdContent + "/" + content + "/" + f.ids[layer]
}

type hcWant struct{ host, snapshot, detail string }

func hcAssertProblems(t *testing.T, got []storage.Problem, want []hcWant) {
	t.Helper()
	matches := func(p storage.Problem, w hcWant) bool {
		return p.Host == w.host && p.Snapshot == w.snapshot && strings.Contains(p.Detail, w.detail)
	}
	list := func() string {
		var b strings.Builder
		for _, p := range got {
			fmt.Fprintf(&b, "  host %q snapshot %q: %s\n", p.Host, p.Snapshot, p.Detail)
		}
		return b.String()
	}
	for _, w := range want {
		assert.True(t, slices.ContainsFunc(got, func(p storage.Problem) bool { return matches(p, w) }),
			"Check did not report host %q snapshot %q: %q\ngot:\n%s", w.host, w.snapshot, w.detail, list())
	}
	for _, p := range got {
		assert.True(t, slices.ContainsFunc(want, func(w hcWant) bool { return matches(p, w) }),
			"unexpected problem host %q snapshot %q: %s\ngot:\n%s", p.Host, p.Snapshot, p.Detail, list())
	}
}

func TestCheckHostScopedCleanRootHasNoProblems(t *testing.T) {
	f := newHCFixture(t)
	assert.Empty(t, chkCheck(t, f.a))
	view, err := openHost(t, f.root, storage.WithHostView("b"))
	require.NoError(t, err)
	assert.Empty(t, chkCheck(t, view), "Check through another scope sees the same root")
}

func TestCheckReportsEachCorruptionAcrossScopes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		corrupt func(f *hcFixture)
		want    func(f *hcFixture) []hcWant
	}{
		{
			"binding not counted in its layer's references",
			func(f *hcFixture) {
				l := f.layer("a/base")
				l.Refs = slices.DeleteFunc(l.Refs, func(r [2]string) bool { return r == [2]string{"b", "base"} })
				f.setLayer("a/base", l)
			},
			func(f *hcFixture) []hcWant {
				return []hcWant{{"b", "base", "binding is not counted among the references of shared layer " + f.ids["a/base"]}}
			},
		},
		{
			"layer reference naming no binding",
			func(f *hcFixture) {
				l := f.layer("a/base")
				l.Refs = append(l.Refs, [2]string{"b", "ghost"}) // sorts last
				f.setLayer("a/base", l)
			},
			func(f *hcFixture) []hcWant {
				return []hcWant{{"", "", fmt.Sprintf(`shared layer %s counts a reference by host "b" as "ghost", which is no binding of it`, f.ids["a/base"])}}
			},
		},
		{
			"layer with no references",
			func(f *hcFixture) {
				f.raw.del(f.recordKey("a", "lonely"))
				l := f.layer("a/lonely")
				l.Refs = nil
				f.setLayer("a/lonely", l)
			},
			func(f *hcFixture) []hcWant {
				return []hcWant{{"", "", fmt.Sprintf("shared layer %s has no references", f.ids["a/lonely"])}}
			},
		},
		{
			"content index entry missing",
			func(f *hcFixture) { f.raw.del(f.contentKey("chain-top", "a/top")) },
			func(f *hcFixture) []hcWant {
				return []hcWant{{"", "", fmt.Sprintf("shared layer %s has 0 content index entries, not 1", f.ids["a/top"])}}
			},
		},
		{
			"content index entry naming a missing layer",
			func(f *hcFixture) { f.raw.put(storage.KeyEtcdContent+"/chain-x/999999", []byte{0}) },
			func(f *hcFixture) []hcWant {
				return []hcWant{{"", "", `content index entry "chain-x" names layer 999999, which does not exist`}}
			},
		},
		{
			"content index entry with a wrong parent ID",
			func(f *hcFixture) {
				f.raw.put(f.contentKey("chain-top", "a/top"), binary.AppendUvarint(nil, 12345))
			},
			func(f *hcFixture) []hcWant {
				return []hcWant{
					{"", "", fmt.Sprintf(`content index entry "chain-top" of layer %s (parent 12345) does not match the layer (content "chain-top", parent %s)`, f.ids["a/top"], f.ids["a/base"])},
					{"", "", fmt.Sprintf("shared layer %s has 0 content index entries, not 1", f.ids["a/top"])},
				}
			},
		},
		{
			"content index entry under another content key",
			func(f *hcFixture) {
				f.raw.put(storage.KeyEtcdContent+"/chain-other/"+f.ids["a/base"], []byte{0})
			},
			func(f *hcFixture) []hcWant {
				return []hcWant{
					{"", "", fmt.Sprintf(`content index entry "chain-other" of layer %s`, f.ids["a/base"])},
				}
			},
		},
		{
			"record outside the scopes",
			func(f *hcFixture) {
				v, _, ok := f.raw.get(f.recordKey("a", "plain"))
				require.True(f.raw.t, ok)
				f.raw.put(storage.KeyEtcdSnapshots+"/stray", v)
			},
			func(f *hcFixture) []hcWant {
				return []hcWant{{"", "stray", "record lies outside the host scopes of a host-scoped root"}}
			},
		},
		{
			"record in the scope of a host the root does not list",
			func(f *hcFixture) {
				v, _, ok := f.raw.get(f.recordKey("a", "plain"))
				require.True(f.raw.t, ok)
				f.raw.put(f.recordKey("ghost", "x"), v)
			},
			func(f *hcFixture) []hcWant {
				return []hcWant{{"ghost", "x", "scope of a host the root does not list"}}
			},
		},
		{
			"ID held in two scopes without being a shared layer",
			func(f *hcFixture) {
				v, _, ok := f.raw.get(f.recordKey("a", "plain"))
				require.True(f.raw.t, ok)
				f.raw.put(f.recordKey("b", "dup"), v)
			},
			func(f *hcFixture) []hcWant {
				return []hcWant{{"a", "plain", fmt.Sprintf(`ID %s is also held by "dup" of host "b"`, f.ids["a/plain"])}}
			},
		},
		{
			"active's ID held in another scope",
			func(f *hcFixture) {
				v, _, ok := f.raw.get(f.recordKey("a", "work"))
				require.True(f.raw.t, ok)
				r, err := chkDecodeEtcdRecord(v)
				require.NoError(f.raw.t, err)
				r.Parent, r.Chain = "", nil
				f.raw.put(f.recordKey("b", "stolen"), chkEncodeEtcdRecord(r))
			},
			func(f *hcFixture) []hcWant {
				return []hcWant{{"a", "work", fmt.Sprintf(`ID %s is also held by "stolen" of host "b"`, f.ids["a/work"])}}
			},
		},
		{
			"undecodable layer",
			func(f *hcFixture) { f.raw.put(f.layerKey("a/lonely"), []byte("\x01\xff\xff")) },
			func(f *hcFixture) []hcWant {
				id := f.ids["a/lonely"]
				return []hcWant{
					{"", "", fmt.Sprintf("shared layer %s does not decode", id)},
					{"a", "lonely", fmt.Sprintf("binding of shared layer %s, which does not exist", id)},
					{"", "", fmt.Sprintf(`content index entry "chain-lonely" names layer %s, which does not exist`, id)},
				}
			},
		},
		{
			"shared layer's ID held by a record that is no binding",
			func(f *hcFixture) {
				v, _, ok := f.raw.get(f.recordKey("a", "plain"))
				require.True(f.raw.t, ok)
				r, err := chkDecodeEtcdRecord(v)
				require.NoError(f.raw.t, err)
				r.ID = mustUint(f.raw.t, f.ids["a/lonely"])
				f.raw.put(f.recordKey("b", "impostor"), chkEncodeEtcdRecord(r))
			},
			func(f *hcFixture) []hcWant {
				return []hcWant{{"b", "impostor", fmt.Sprintf("has the ID of shared layer %s", f.ids["a/lonely"])}}
			},
		},
		{
			"binding whose parent chain differs from its layer's",
			func(f *hcFixture) {
				v, _, ok := f.raw.get(f.recordKey("b", "top"))
				require.True(f.raw.t, ok)
				require.Equal(f.raw.t, byte(2), v[0], "a binding's record is version 2")
				r, err := chkDecodeEtcdRecord(append([]byte{1}, v[1:]...))
				require.NoError(f.raw.t, err)
				r.Chain = []uint64{mustUint(f.raw.t, f.ids["a/base"]), 999}
				b := chkEncodeEtcdRecord(r)
				b[0] = 2
				f.raw.put(f.recordKey("b", "top"), b)
			},
			func(f *hcFixture) []hcWant {
				return []hcWant{
					{"b", "top", "parent chain [" + f.ids["a/base"] + " 999] differs from its shared layer's [" + f.ids["a/base"] + "]"},
					{"b", "top", ""},
				}
			},
		},
		{
			"a scope's own corruption names its host",
			func(f *hcFixture) {
				f.raw.del(storage.KeyEtcdScopes + "/a/" + storage.KeyEtcdChildren + "/top/" + f.ids["a/work"])
			},
			func(f *hcFixture) []hcWant {
				return []hcWant{{"a", "work", ""}}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newHCFixture(t)
			require.Empty(t, chkCheck(t, f.a), "clean before the corruption")
			tc.corrupt(f)
			hcAssertProblems(t, chkCheck(t, f.a), tc.want(f))
		})
	}
}

var _ = snapshots.KindActive
