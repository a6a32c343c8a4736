// kstatus-verdict prints the verdict sigs.k8s.io/cli-utils' kstatus gives each object it
// reads: the same library Flux's kustomize-controller, kpt and cli-utils' wait use, so the
// tests can check that a ModelDeployment reads the same there as in Argo CD (health.lua).
//
//	kstatus-verdict [--json] [FILE...]   FILE or stdin ("-"): YAML or JSON, several
//	                                     documents, or a List (kubectl get -o yaml)
//	kstatus-verdict --version            the cli-utils version it was built with
//
// Text output is one line per object: NAMESPACE/NAME<TAB>STATUS<TAB>MESSAGE; --json prints
// one JSON object per line with the fields name, namespace, status, message, conditions.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Source     string             `json:"source"`
	Namespace  string             `json:"namespace"`
	Name       string             `json:"name"`
	Status     string             `json:"status"`
	Message    string             `json:"message"`
	Conditions []status.Condition `json:"conditions"`
}

func main() {
	asJSON := false
	var files []string
	for _, arg := range os.Args[1:] {
		switch arg {
		case "--json":
			asJSON = true
		case "--version":
			fmt.Println(cliUtilsVersion())
			return
		case "-h", "--help":
			fmt.Println("usage: kstatus-verdict [--json] [FILE...]   (stdin when no FILE, or -)")
			return
		default:
			files = append(files, arg)
		}
	}
	if len(files) == 0 {
		files = []string{"-"}
	}
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for _, file := range files {
		verdicts, err := verdictsOf(file)
		if err != nil {
			out.Flush()
			fmt.Fprintf(os.Stderr, "kstatus-verdict: %s: %v\n", file, err)
			os.Exit(1)
		}
		for _, v := range verdicts {
			if asJSON {
				line, _ := json.Marshal(v)
				fmt.Fprintln(out, string(line))
			} else {
				fmt.Fprintf(out, "%s/%s\t%s\t%s\n", v.Namespace, v.Name, v.Status, v.Message)
			}
		}
	}
}

func verdictsOf(file string) ([]verdict, error) {
	var reader io.Reader = os.Stdin
	if file != "-" {
		f, err := os.Open(file)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		reader = f
	}
	objects, err := decode(reader)
	if err != nil {
		return nil, err
	}
	var verdicts []verdict
	for _, u := range objects {
		result, err := status.Compute(u)
		if err != nil {
			return nil, fmt.Errorf("%s/%s: %w", u.GetNamespace(), u.GetName(), err)
		}
		verdicts = append(verdicts, verdict{
			Source:     file,
			Namespace:  u.GetNamespace(),
			Name:       u.GetName(),
			Status:     result.Status.String(),
			Message:    result.Message,
			Conditions: result.Conditions,
		})
	}
	return verdicts, nil
}

// decode reads every document; the unstructured JSON scheme keeps integers as int64, which
// kstatus needs to compare metadata.generation with status.observedGeneration.
func decode(reader io.Reader) ([]*unstructured.Unstructured, error) {
	decoder := utilyaml.NewYAMLOrJSONDecoder(reader, 4096)
	var objects []*unstructured.Unstructured
	for {
		var raw json.RawMessage
		if err := decoder.Decode(&raw); err != nil {
			if errors.Is(err, io.EOF) {
				return objects, nil
			}
			return nil, err
		}
		if len(raw) == 0 || string(raw) == "null" {
			continue
		}
		obj, _, err := unstructured.UnstructuredJSONScheme.Decode(raw, nil, nil)
		if err != nil {
			return nil, err
		}
		switch o := obj.(type) {
		case *unstructured.Unstructured:
			objects = append(objects, o)
		case *unstructured.UnstructuredList:
			for i := range o.Items {
				objects = append(objects, &o.Items[i])
			}
		default:
			return nil, fmt.Errorf("unexpected %T", obj)
		}
	}
}

func cliUtilsVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == "sigs.k8s.io/cli-utils" {
				return dep.Version
			}
		}
	}
	return "unknown"
}
