//! `#[derive(Mapped)]` for `keel-repository`: declares an entity's table and
//! columns with attributes and generates its `keel_core::Entity` and
//! `keel_repository::Mapped` implementations.
//!
//! Use it through `keel_repository::Mapped` (feature `derive`, on by
//! default); see that crate for the attributes.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::quote;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, GenericArgument, LitStr, PathArguments, Type};

/// Derives `keel_core::Entity` and `keel_repository::Mapped`.
///
/// ```ignore
/// #[derive(Clone, Debug, keel_repository::Mapped)]
/// #[keel(table = "customers", name = "customer")]
/// struct Customer {
///     #[keel(id)]
///     id: uuid::Uuid,
///     #[keel(filterable, sortable)]
///     email: String,
///     #[keel(column = "tier_level", filterable)]
///     tier: i32,
///     note: Option<String>,
///     profile: serde_json::Value,
/// }
/// ```
///
/// Column types follow the field types: `bool`, `i32`, `i64`, `f64`,
/// `String`, `Uuid`, `DateTime<Utc>`, `serde_json::Value` (JSONB), and
/// `Option<…>` of those for nullable columns.
#[proc_macro_derive(Mapped, attributes(keel))]
pub fn derive_mapped(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as DeriveInput);
    expand(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

struct FieldSpec {
    ident: syn::Ident,
    column: String,
    ty: TokenStream2,
    nullable: bool,
    id: bool,
    filterable: bool,
    sortable: bool,
    rust_ty: Type,
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let name = &input.ident;
    if !input.generics.params.is_empty() {
        return Err(syn::Error::new(
            input.generics.span(),
            "#[derive(Mapped)] does not support generic entities",
        ));
    }
    let mut table = None;
    let mut entity_name = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("keel")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("table") {
                table = Some(meta.value()?.parse::<LitStr>()?);
                Ok(())
            } else if meta.path.is_ident("name") {
                entity_name = Some(meta.value()?.parse::<LitStr>()?);
                Ok(())
            } else {
                Err(meta.error("expected `table = \"…\"` or `name = \"…\"`"))
            }
        })?;
    }
    let table = table.ok_or_else(|| {
        syn::Error::new(
            Span::call_site(),
            "#[derive(Mapped)] needs #[keel(table = \"…\")] on the struct",
        )
    })?;
    let entity_name = entity_name
        .unwrap_or_else(|| LitStr::new(&snake_case(&name.to_string()), Span::call_site()));

    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new(
            Span::call_site(),
            "#[derive(Mapped)] works on structs with named fields",
        ));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new(
            data.fields.span(),
            "#[derive(Mapped)] works on structs with named fields",
        ));
    };

    let mut specs = Vec::new();
    for field in &fields.named {
        let ident = field.ident.clone().expect("named field");
        let mut spec = FieldSpec {
            column: ident.to_string().trim_start_matches("r#").to_owned(),
            ident,
            ty: TokenStream2::new(),
            nullable: false,
            id: false,
            filterable: false,
            sortable: false,
            rust_ty: field.ty.clone(),
        };
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("keel")) {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("id") {
                    spec.id = true;
                } else if meta.path.is_ident("filterable") {
                    spec.filterable = true;
                } else if meta.path.is_ident("sortable") {
                    spec.sortable = true;
                } else if meta.path.is_ident("column") {
                    spec.column = meta.value()?.parse::<LitStr>()?.value();
                } else {
                    return Err(
                        meta.error("expected `id`, `filterable`, `sortable` or `column = \"…\"`")
                    );
                }
                Ok(())
            })?;
        }
        let (inner, nullable) = match option_inner(&field.ty) {
            Some(inner) => (inner, true),
            None => (&field.ty, false),
        };
        spec.nullable = nullable;
        spec.ty = column_type(inner)?;
        specs.push(spec);
    }

    let ids: Vec<&FieldSpec> = specs.iter().filter(|s| s.id).collect();
    let id = match ids.as_slice() {
        [one] => *one,
        [] => {
            return Err(syn::Error::new(
                Span::call_site(),
                "mark the id field with #[keel(id)]",
            ));
        }
        [_, second, ..] => {
            return Err(syn::Error::new(
                second.ident.span(),
                "only one field can be #[keel(id)]",
            ));
        }
    };
    let id_ident = &id.ident;
    let id_ty = &id.rust_ty;
    let id_column = &id.column;
    let id_col_ty = &id.ty;

    let columns = specs.iter().filter(|s| !s.id).map(|s| {
        let column = &s.column;
        let ty = &s.ty;
        let mut expr =
            quote!(::keel_repository::Column::new(#column, ::keel_repository::ColumnType::#ty));
        if s.nullable {
            expr = quote!(#expr.nullable());
        }
        if s.filterable {
            expr = quote!(#expr.filterable());
        }
        if s.sortable {
            expr = quote!(#expr.sortable());
        }
        quote!(.column(#expr))
    });
    let writes = specs.iter().map(|s| {
        let ident = &s.ident;
        let column = &s.column;
        quote!(row.set(#column, ::core::clone::Clone::clone(&self.#ident));)
    });
    let reads = specs.iter().map(|s| {
        let ident = &s.ident;
        let column = &s.column;
        quote!(#ident: row.get(#column)?,)
    });

    Ok(quote! {
        impl ::keel_repository::__private::keel_core::Entity for #name {
            type Id = #id_ty;
            const NAME: &'static str = #entity_name;
            fn id(&self) -> &#id_ty {
                &self.#id_ident
            }
        }

        impl ::keel_repository::Mapped for #name {
            fn mapping() -> ::keel_repository::Mapping {
                ::keel_repository::Mapping::new(#table)
                    .id(#id_column, ::keel_repository::ColumnType::#id_col_ty)
                    #(#columns)*
            }

            fn id_value(id: &#id_ty) -> ::keel_repository::Value {
                ::keel_repository::Value::from(::core::clone::Clone::clone(id))
            }

            fn write(&self, row: &mut ::keel_repository::RowWriter<'_>) {
                #(#writes)*
            }

            fn read(row: &mut ::keel_repository::Row<'_>) -> ::keel_repository::Result<Self> {
                ::core::result::Result::Ok(Self { #(#reads)* })
            }
        }
    })
}

/// `T` when `ty` is `Option<T>`.
fn option_inner(ty: &Type) -> Option<&Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Option" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        GenericArgument::Type(t) => Some(t),
        _ => None,
    }
}

/// The `ColumnType` variant for a field type, by its last path segment.
fn column_type(ty: &Type) -> syn::Result<TokenStream2> {
    let unsupported = || {
        syn::Error::new(
            ty.span(),
            "unsupported column type: use bool, i32, i64, f64, String, Uuid, DateTime<Utc>, \
             serde_json::Value, or an Option of one of them",
        )
    };
    let Type::Path(p) = ty else {
        return Err(unsupported());
    };
    let last = p.path.segments.last().ok_or_else(unsupported)?;
    let variant = match last.ident.to_string().as_str() {
        "bool" => "Bool",
        "i32" => "I32",
        "i64" => "I64",
        "f64" => "F64",
        "String" => "Text",
        "Uuid" => "Uuid",
        "DateTime" => "Timestamp",
        "Value" | "JsonValue" => "Json",
        _ => return Err(unsupported()),
    };
    let ident = syn::Ident::new(variant, Span::call_site());
    Ok(quote!(#ident))
}

fn snake_case(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}
