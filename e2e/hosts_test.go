package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
)

// Host scopes under real daemons: two containerds, each with its own
// snapshotter daemon and host identity (A and B), on one etcd root and one
// data root.
//
// Layers are shared only when containerd's unpacker labels its Prepare
// with containerd.io/snapshot.ref, which containerd 1.6 does on a pull
// (client.Pull with unpack) and not on "ctr images import" (nor on "ctr
// images pull", which unpacks the same way as import). The sharing tests
// therefore pull, with containerd's Go client, from a registry the test
// serves on 127.0.0.1; the test of colliding names imports.

func TestContainerdHostsOverlay(t *testing.T) { testHosts(t, "overlay") }
func TestContainerdHostsNative(t *testing.T)  { testHosts(t, "native") }

func TestContainerdHostsCollidingNamesOverlay(t *testing.T) { testCollidingNames(t, "overlay") }

// hostTTL is host A's --host-ttl: short, so that A's host is gone soon
// after its daemon is killed. B, which must stay alive through every
// step however loaded the machine is, keeps a long one (liveTTL).
const (
	hostTTL = 3 * time.Second
	liveTTL = time.Minute
)

// hostsRoot is the etcd root the hosts share.
const hostsRoot = "e2e/hosts"

// hostPair is two hosts on one etcd root and one data root.
type hostPair struct {
	a, b *env
	etcd *etcdtest.Cluster
}

// newHosts starts hosts A and B (driver), each a containerd with its
// snapshotter daemon, on one etcd and one data root.
func newHosts(t *testing.T, driver string) *hostPair {
	t.Helper()
	requirePrerequisites(t)
	c := etcdtest.Start(t)
	var endpoints []string
	for _, ep := range c.Endpoints() {
		endpoints = append(endpoints, strings.TrimPrefix(ep, "http://"))
	}
	flags := []string{"--store", "etcd://" + strings.Join(endpoints, ",") + "/" + hostsRoot}
	root := filepath.Join(t.TempDir(), "shared")
	view := func(host string) func() (storage.MetaStore, error) {
		return func() (storage.MetaStore, error) {
			cfg := c.ClientConfig()
			return storage.NewEtcdStore(hostsRoot, &cfg, storage.WithHostView(host))
		}
	}
	start := func(host string, ttl time.Duration) *env {
		return startEnv(t, driver, etcdStore, &sharedSetup{
			root: root, storeFlags: flags, openStore: view(host),
			daemonArgs: []string{"--host", host, "--host-ttl", ttl.String()},
		})
	}
	return &hostPair{a: start("A", hostTTL), b: start("B", liveTTL), etcd: c}
}

// step runs fn as a step of the test (see env.step), with both hosts'
// checks pointed at it.
func (h *hostPair) step(name string, fn func(t *testing.T)) {
	h.a.top.Helper()
	h.a.step(name, func(t *testing.T) {
		h.b.t = t
		defer func() { h.b.t = h.b.top }()
		fn(t)
	})
}

// rootKeys counts the keys of the shared root under prefix (below
// storage.v1/).
func (h *hostPair) rootKeys(t *testing.T, prefix string) int64 {
	t.Helper()
	cli, err := clientv3.New(h.etcd.ClientConfig())
	require.NoError(t, err)
	defer cli.Close()
	resp, err := cli.Get(context.Background(), hostsRoot+"/"+storage.KeyEtcdVersion+"/"+prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	require.NoError(t, err)
	return resp.Count
}

// serveRegistry serves img as an OCI distribution registry (plain HTTP on
// 127.0.0.1, read-only) until the test ends, and returns the reference
// that pulls it.
func serveRegistry(t *testing.T, img image) string {
	t.Helper()
	var index ocispec.Index
	b, err := os.ReadFile(filepath.Join(img.dir, "index.json"))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &index))
	require.Len(t, index.Manifests, 1)
	manifest := index.Manifests[0]
	tag := manifest.Annotations[ocispec.AnnotationRefName]
	const repo = "snapmeta-e2e"
	serveBlob := func(w http.ResponseWriter, r *http.Request, ref, mediaType string) {
		d, err := digest.Parse(ref)
		if err != nil {
			http.NotFound(w, r)
			return
		}
		f, err := os.Open(filepath.Join(img.dir, "blobs", d.Algorithm().String(), d.Encoded()))
		if err != nil {
			http.NotFound(w, r)
			return
		}
		defer f.Close()
		w.Header().Set("Content-Type", mediaType)
		w.Header().Set("Docker-Content-Digest", d.String())
		http.ServeContent(w, r, "", time.Time{}, f)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Path
		switch {
		case p == "/v2/" || p == "/v2":
			w.WriteHeader(http.StatusOK)
		case strings.HasPrefix(p, "/v2/"+repo+"/manifests/"):
			ref := path.Base(p)
			if ref == tag {
				ref = manifest.Digest.String()
			}
			if ref != manifest.Digest.String() {
				http.NotFound(w, r)
				return
			}
			serveBlob(w, r, ref, manifest.MediaType)
		case strings.HasPrefix(p, "/v2/"+repo+"/blobs/"):
			serveBlob(w, r, path.Base(p), "application/octet-stream")
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://") + "/" + repo + ":" + tag
}

// pull pulls ref with containerd's Go client, unpacking it into the
// snapshotter as containerd's unpacker does: its Prepares carry the
// containerd.io/snapshot.ref label.
func (e *env) pull(ref string) {
	t := e.t
	t.Helper()
	cl, err := containerd.New(e.ctrdSock, containerd.WithTimeout(10*time.Second))
	require.NoError(t, err)
	defer cl.Close()
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: docker.ConfigureDefaultRegistries(
		docker.WithPlainHTTP(docker.MatchAllHosts), docker.WithClient(&http.Client{Transport: tr}))})
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), 2*time.Minute)
	defer cancel()
	_, err = cl.Pull(ctx, ref, containerd.WithPullUnpack, containerd.WithPullSnapshotter(snapshotter), containerd.WithResolver(resolver))
	require.NoError(t, err, "pull %s", ref)
}

// committed returns the committed snapshots of the tests' namespace in
// the host's scope.
func (e *env) committed() map[string]record {
	out := map[string]record{}
	e.inspect(func(ms storage.MetaStore) {
		for n, r := range ofTests(readStore(e.t, ms)) {
			if r.info.Kind == snapshots.KindCommitted {
				out[n] = r
			}
		}
	})
	return out
}

// eventuallyTests waits until the host's scope holds n snapshots of the
// tests' namespace (a collection's removals may still be under way when
// a collection that found nothing to do returns), and checks the store.
func (e *env) eventuallyTests(t *testing.T, n int) {
	t.Helper()
	var recs map[string]record
	eventually(t, 30*time.Second, func() bool {
		e.inspect(func(ms storage.MetaStore) { recs = ofTests(readStore(t, ms)) })
		return len(recs) == n
	}, func() string { return fmt.Sprintf("%d snapshots, not %d: %v", len(recs), n, recs) })
	e.inspect(func(ms storage.MetaStore) { requireClean(t, ms) })
}

// idsOf returns the IDs of recs, sorted.
func idsOf(recs map[string]record) []string {
	var ids []string
	for _, r := range recs {
		ids = append(ids, r.id)
	}
	slices.Sort(ids)
	return ids
}

// byTarget returns the record of recs labelled with the chain ID target.
func byTarget(t *testing.T, recs map[string]record, target string) record {
	t.Helper()
	for _, r := range recs {
		if r.info.Labels[snapshots.LabelSnapshotRef] == target {
			return r
		}
	}
	t.Fatalf("no snapshot labelled %s in %v", target, recs)
	return record{}
}

// runDetached starts container id from ref: it writes body to file, then
// sleeps; runDetached returns once file is there.
func (e *env) runDetached(ref, id, file, body string) {
	t := e.t
	t.Helper()
	e.mustCtr("run", "-d", "--snapshotter", snapshotter, ref, id, "sh", "-c", fmt.Sprintf("echo %s > %s; exec sleep 600", body, file))
	eventually(t, 30*time.Second, func() bool {
		out, err := e.exec(id, "cat", file)
		return err == nil && out == body+"\n"
	}, func() string { return file + " not written in " + id })
}

// exec runs a command in the running container id.
func (e *env) exec(id string, args ...string) (string, error) {
	e.execs++
	return e.ctr(30*time.Second, append([]string{"tasks", "exec", "--exec-id", fmt.Sprintf("e2e-exec-%d", e.execs), id}, args...)...)
}

// stopContainer kills container id's task and removes it; with
// removeContainer, the container too.
func (e *env) stopContainer(id string, removeContainer bool) {
	t := e.t
	t.Helper()
	e.mustCtr("tasks", "kill", "-s", "SIGKILL", id)
	eventually(t, 30*time.Second, func() bool {
		_, err := e.ctr(30*time.Second, "tasks", "rm", id)
		return err == nil
	}, func() string { return "task " + id + " not stopped" })
	if removeContainer {
		e.mustCtr("containers", "rm", id)
	}
}

// testHosts: two hosts share an image's layers, keep them while the other
// host drops them, drop them all together, and one takes over the
// container snapshot of the other after its daemon was killed.
func testHosts(t *testing.T, driver string) {
	h := newHosts(t, driver)
	a, b := h.a, h.b
	img := smallImage(t)
	ref := serveRegistry(t, img)
	chain := img.chainIDs()
	top := chain[len(chain)-1].String()
	cid := func(s string) string { return fmt.Sprintf("e2e-hosts-%s-%d-%s", driver, os.Getpid(), s) }

	h.step("both import, B unpacks nothing", func(t *testing.T) {
		a.pull(ref)
		aLayers := a.committed()
		require.Len(t, aLayers, len(chain), "A's layers: %v", aLayers)
		dirs := a.snapshotDirs()
		require.Len(t, dirs, len(chain))

		b.pull(ref)
		// Every committed snapshot of B is a binding of a layer A
		// unpacked: A's IDs, and no new directory.
		bLayers := b.committed()
		require.Len(t, bLayers, len(chain), "B's layers: %v", bLayers)
		assert.Equal(t, idsOf(aLayers), idsOf(bLayers))
		assert.Equal(t, dirs, b.snapshotDirs(), "B made no snapshot directory")
		var parent string
		for _, c := range chain {
			r := byTarget(t, bLayers, c.String())
			assert.Equal(t, byTarget(t, aLayers, c.String()).id, r.id)
			assert.Equal(t, parent, r.info.Parent, "B's binding of %s is on B's binding of its parent", c)
			parent = r.name
		}
		// containerd on B knows the chain as its own.
		ls := b.mustSnap("ls")
		for _, c := range chain {
			assert.Regexp(t, "(?m)^"+regexp.QuoteMeta(c.String())+`\s.*Committed\s*$`, ls)
		}
		b.inspect(func(ms storage.MetaStore) { requireClean(t, ms) })
	})

	h.step("A drops the image, B keeps running", func(t *testing.T) {
		b.runDetached(ref, cid("b-1"), "/marker", "from-b")
		withContainer := b.snapshotDirs()
		require.Len(t, withContainer, len(chain)+1)

		a.mustCtr("images", "rm", "--sync", ref)
		a.collectGarbage()
		eventually(t, 30*time.Second, func() bool { return len(a.committed()) == 0 },
			func() string { return "A's layers are still in its scope" })
		assert.Equal(t, withContainer, b.snapshotDirs(), "A's collection deleted a directory")
		out, err := b.exec(cid("b-1"), "sh", "-c", "cat /marker /etc/e2e-message /data/kept")
		require.NoError(t, err)
		assert.Equal(t, "from-b\nfrom layer 3\nkept\n", out)
		out = b.mustCtr("run", "--rm", "--snapshotter", snapshotter, ref, cid("b-2"), "cat", "/etc/e2e-message")
		assert.Equal(t, "from layer 3\n", out)
		// The new container's snapshot goes at a collection.
		b.collectGarbage()
		b.eventuallyTests(t, len(chain)+1)
	})

	h.step("both drop it, nothing is left", func(t *testing.T) {
		b.stopContainer(cid("b-1"), true)
		b.mustCtr("images", "rm", "--sync", ref)
		b.collectGarbage()
		a.collectGarbage()
		eventually(t, 60*time.Second, func() bool { return len(b.snapshotDirs()) == 0 },
			func() string { return "snapshot directories left: " + strings.Join(b.snapshotDirs(), " ") })
		for _, e := range []*env{a, b} {
			e.inspect(func(ms storage.MetaStore) {
				requireClean(t, ms)
				assert.Empty(t, readStore(t, ms))
			})
		}
		assert.Zero(t, h.rootKeys(t, storage.KeyEtcdLayers+"/"), "shared layers left")
		assert.Zero(t, h.rootKeys(t, storage.KeyEtcdContent+"/"), "content index entries left")
	})

	h.step("B takes over A's container after A's daemon was killed", func(t *testing.T) {
		a.pull(ref)
		b.pull(ref)
		a.runDetached(ref, cid("a-1"), "/marker-a", "from-a")
		var aName string
		a.inspect(func(ms storage.MetaStore) {
			r, ok := backendName(t, readStore(t, ms), cid("a-1"))
			require.True(t, ok)
			assert.Equal(t, snapshots.KindActive, r.info.Kind)
			aName = r.name
		})
		bTop := byTarget(t, b.committed(), top)
		// A's machine goes: its container stops, its daemon is killed.
		a.stopContainer(cid("a-1"), false)
		a.daemon.kill()

		view, err := b.openStore()
		require.NoError(t, err)
		defer func() { require.NoError(t, view.Close()) }()
		const taken = "e2e-taken"
		takeOver := func() error {
			return view.WithTransaction(context.Background(), true, func(ctx context.Context) error {
				_, err := storage.TakeOver(ctx, "A", aName, taken, bTop.name)
				return err
			})
		}
		killed := time.Now()
		err = takeOver()
		require.ErrorIs(t, err, storage.ErrHostAlive, "a takeover within A's TTL")
		assert.Less(t, time.Since(killed), hostTTL, "the refusal came within the TTL")
		eventually(t, hostTTL+10*time.Second, func() bool {
			err = takeOver()
			return err == nil
		}, func() string { return fmt.Sprintf("takeover: %v", err) })
		t.Logf("taken over %v after the kill", time.Since(killed).Round(time.Millisecond))

		// Right away (B's containerd would collect the snapshot, which
		// its meta.db does not know, at its next collection): B's daemon
		// mounts it, through containerd's snapshots proxy.
		conn, err := grpc.NewClient("unix://"+b.daemonSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		require.NoError(t, err)
		defer conn.Close()
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), snapshotter)
		ctx := context.Background()
		mounts, err := sn.Mounts(ctx, taken)
		require.NoError(t, err)
		require.Len(t, mounts, 1)
		m := mnt{typ: mounts[0].Type, source: mounts[0].Source, options: mounts[0].Options}
		b.withTree(t, m, func(dir string) {
			assertFile(t, filepath.Join(dir, "marker-a"), "from-a\n")
			assertFile(t, filepath.Join(dir, "etc/e2e-message"), "from layer 3\n")
		})
		require.NoError(t, sn.Remove(ctx, taken))
		b.inspect(func(ms storage.MetaStore) { requireClean(t, ms) })
	})
}

// testCollidingNames: two fresh hosts doing identical steps get identical
// backend names, each in its scope, and never touch each other's
// snapshots. The image is imported ("ctr images import" labels nothing,
// so each host unpacks its own copy).
func testCollidingNames(t *testing.T, driver string) {
	h := newHosts(t, driver)
	a, b := h.a, h.b
	img := smallImage(t)
	chain := img.chainIDs()
	top := chain[len(chain)-1].String()

	h.step("identical steps, identical names", func(t *testing.T) {
		for _, e := range []*env{a, b} {
			e.mustCtr("images", "import", "--base-name", imageBase, "--snapshotter", snapshotter, img.path)
			e.mustSnap("prepare", "e2e-same", top)
		}
		var recs [2]map[string]record
		for i, e := range []*env{a, b} {
			e.inspect(func(ms storage.MetaStore) { recs[i] = ofTests(readStore(t, ms)) })
		}
		require.Len(t, recs[0], len(chain)+1)
		names := func(m map[string]record) []string {
			var ns []string
			for n := range m {
				ns = append(ns, n)
			}
			slices.Sort(ns)
			return ns
		}
		assert.Equal(t, names(recs[0]), names(recs[1]), "the same backend names in both scopes")
		for n, r := range recs[0] {
			assert.NotEqual(t, r.id, recs[1][n].id, "%s has an ID of its own in each scope", n)
		}
		assert.Len(t, a.snapshotDirs(), 2*(len(chain)+1))
	})

	h.step("A drops everything, B keeps its own", func(t *testing.T) {
		a.mustSnap("rm", "e2e-same")
		a.mustCtr("images", "rm", "--sync", img.name)
		a.collectGarbage()
		// The collection's removals may still be under way when a
		// collection that found nothing to do returns.
		eventually(t, 30*time.Second, func() bool {
			var left int
			a.inspect(func(ms storage.MetaStore) { left = len(ofTests(readStore(t, ms))) })
			return left == 0 && len(b.snapshotDirs()) == len(chain)+1
		}, func() string { return "A's snapshots are still there: " + strings.Join(b.snapshotDirs(), " ") })
		out := b.mustCtr("run", "--rm", "--snapshotter", snapshotter, img.name,
			fmt.Sprintf("e2e-hosts-same-%d", os.Getpid()), "cat", "/etc/e2e-message")
		assert.Equal(t, "from layer 3\n", out)
		b.collectGarbage()
		b.eventuallyTests(t, len(chain)+1)
	})

	h.step("B drops everything", func(t *testing.T) {
		b.mustSnap("rm", "e2e-same")
		b.mustCtr("images", "rm", "--sync", img.name)
		b.collectGarbage()
		eventually(t, 60*time.Second, func() bool { return len(b.snapshotDirs()) == 0 },
			func() string { return "snapshot directories left: " + strings.Join(b.snapshotDirs(), " ") })
		for _, e := range []*env{a, b} {
			e.inspect(func(ms storage.MetaStore) {
				requireClean(t, ms)
				assert.Empty(t, readStore(t, ms))
			})
		}
	})
}
